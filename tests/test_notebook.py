"""The notebook path: examples/fruitpipe.ipynb executed headless (nbclient, a real kernel and its own Spark) on a
small subset; the library API uses a caller's SparkSession and never stops it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nbformat
from nbclient import NotebookClient

import fruitpipe
from conftest import MODELS, ROOT, copy_classes, sample_classes

NOTEBOOK = ROOT / "examples" / "fruitpipe.ipynb"


def _text(nb: nbformat.NotebookNode) -> str:
    return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def _images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.get("outputs", []))


def test_the_notebook_runs_headless_and_shows_scree_projection_and_classifier(trained, tmp_path: Path) -> None:
    """On a copy of a trained output (the classifier branch) and on a fresh subset (the first run, no classifier)."""
    out = tmp_path / "trained-out"
    shutil.copytree(trained["out"], out, ignore=shutil.ignore_patterns("_lease.json"))
    fresh_in = copy_classes(tmp_path / "in", sample_classes(3), splits=("Training",), per_split=8)
    runs = {"trained": (trained["out"].parent / "in", out, 8), "fresh": (fresh_in, tmp_path / "fresh-out", 4)}
    for name, (data, output, k) in runs.items():
        nb = nbformat.read(NOTEBOOK, as_version=4)
        env = {"FRUITPIPE_NB_INPUT": str(data), "FRUITPIPE_NB_OUTPUT": str(output), "FRUITPIPE_NB_MASTER": "local[2]",
               "FRUITPIPE_NB_K": str(k),
               # What a notebook cluster sets (the model `emr upload` put in S3): the fresh run reads that file.
               "FRUITPIPE_NB_MODEL_PATH": str(MODELS / "mobilenet_v2_features.onnx") if name == "fresh" else ""}
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)  # the kernel inherits this process's environment
        try:
            NotebookClient(nb, timeout=600, kernel_name="python3",
                           resources={"metadata": {"path": str(tmp_path)}}).execute()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if o.get("output_type") == "error"]
        assert not errors, errors
        text = _text(nb)
        report = json.loads((output / "run.json").read_text())
        counts = report["counts"]
        assert f"listed {counts['listed']}, embedded {counts['embedded']}" in text and "accounted: True" in text
        assert f"PCA: k = {k} explains" in text
        assert _images(nb) == 2  # the scree curve and the 2-D projection
        if name == "trained":
            top1 = trained["metrics"]["top1"]
            assert counts["embedded_this_run"] == 0 and f"top-1 {top1:.2%}" in text
        else:
            assert counts["embedded"] == 24 and "no classifier yet" in text
        assert (report["model"]["source"] == "model_path") is (name == "fresh")


def test_the_library_uses_the_callers_session_and_never_stops_it(spark, tmp_path: Path) -> None:
    data = copy_classes(tmp_path / "in", sample_classes(2), splits=("Training",), per_split=5)
    result = fruitpipe.run(fruitpipe.Config(input=str(data), output=str(tmp_path / "out"), k=3, quiet=True),
                           spark=spark)
    assert result.counts["embedded"] == 10 and result.report["timings_s"]["spark_start"] == 0.0
    assert spark.sparkContext._jsc is not None and spark.range(3).count() == 3  # still running
