"""`fruitpipe drift` on real photos, and `--pca-from` (a stable basis): Training vs Test of the same classes is no
drift; darkened, blurred or rotated copies and classes the reference never saw are drift (exit code 3)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageEnhance, ImageFilter
from prometheus_client.parser import text_string_to_metric_families

import fruitpipe
from conftest import SAMPLE, copy_classes, sample_classes
from fruitpipe.cli import main
from fruitpipe.drift.compare import DRIFT_EXIT_CODE
from fruitpipe.drift.stats import DriftSettings, detect

CLASSES = sample_classes(10)[5:]  # not the `trained` fixture's: this module trains its own reference
OTHERS = sample_classes(10)[:5]
PERTURB = {
    "dark": lambda img: ImageEnhance.Brightness(img).enhance(0.5),
    "blur": lambda img: img.filter(ImageFilter.GaussianBlur(2)),
    # a phone's photo whose EXIF orientation was lost on the way: a quarter turn (weaker ones: docs/drift.md)
    "rotated": lambda img: img.rotate(90, resample=Image.Resampling.BILINEAR, fillcolor=(255, 255, 255)),
}


def _perturbed(dest: Path, name: str) -> Path:
    for src in sorted((SAMPLE / "Test").glob("*/*.jpg")):
        if src.parent.name in CLASSES:
            out = dest / "Test" / src.parent.name / src.name
            out.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            PERTURB[name](Image.open(src).convert("RGB")).save(buf, "JPEG", quality=95)
            out.write_bytes(buf.getvalue())
    return dest


@pytest.fixture(scope="module")
def outputs(spark, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Reference = Training of 5 classes (300 photos) with its PCA and a classifier; the others = 100 photos each:
    Test of the same classes, its darkened/blurred/rotated copies, Test of 5 other classes."""
    root = tmp_path_factory.mktemp("drift")
    inputs = {
        "reference": copy_classes(root / "in-ref", CLASSES, splits=("Training",)),
        "test": copy_classes(root / "in-test", CLASSES, splits=("Test",)),
        "unseen": copy_classes(root / "in-unseen", OTHERS, splits=("Test",)),
        **{name: _perturbed(root / f"in-{name}", name) for name in PERTURB},
    }
    outs = {}
    for name, data in inputs.items():
        outs[name] = root / f"out-{name}"
        fruitpipe.run(fruitpipe.Config(input=str(data), output=str(outs[name]), k=8, quiet=True), spark=spark)
    assert main(["train", str(outs["reference"]), "-q", "--folds", "2", "--no-pca-table"]) == 0
    return outs


def _drift(outputs: dict[str, Path], current: str, *extra: str) -> tuple[int, dict]:
    rc = main(["drift", str(outputs["reference"]), str(outputs[current]), "-q", *extra])
    return rc, json.loads((outputs[current] / "drift" / "drift.json").read_text())


def test_training_vs_test_of_the_same_classes_is_no_drift(outputs) -> None:
    rc, result = _drift(outputs, "test")
    assert rc == 0 and result["drift"] is False and result["drifted_tests"] == []
    assert set(result["tests"]) == {"components", "multivariate", "rejects", "predictions", "confidence"}
    assert result["reference"]["sampled"] == 300 and result["current"]["sampled"] == 100
    assert result["basis"]["k"] == 8 and result["alpha_per_test"] == pytest.approx(0.01 / 5)
    assert result["tests"]["predictions"]["total_variation"] < 0.1  # 20 photos per class either side
    page = (outputs["test"] / "drift" / "drift.html").read_text()
    assert "No drift" in page and page.count("data:image/png;base64,") == 3 and "http" not in page


@pytest.mark.parametrize("current", sorted(PERTURB))
def test_darkened_blurred_or_rotated_copies_are_drift(outputs, current: str, tmp_path: Path) -> None:
    prom = tmp_path / "drift.prom"
    rc, result = _drift(outputs, current, "--metrics-file", str(prom))
    assert rc == DRIFT_EXIT_CODE and result["drift"] is True
    assert "components" in result["drifted_tests"] and result["tests"]["components"]["drifted_components"]
    assert "Drift detected" in (outputs[current] / "drift" / "drift.html").read_text()
    samples = {s.name: s.value for f in text_string_to_metric_families(prom.read_text()) for s in f.samples}
    assert samples["fruitpipe_drift_detected"] == 1 and samples["fruitpipe_last_run_success"] == 1


def test_classes_never_seen_in_the_reference_are_drift(outputs) -> None:
    rc, result = _drift(outputs, "unseen")
    assert rc == DRIFT_EXIT_CODE and {"components", "multivariate"} <= set(result["drifted_tests"])


def test_a_report_dir_elsewhere_and_errors_in_one_line(outputs, tmp_path: Path, capsys) -> None:
    rc = main(["drift", str(outputs["reference"]), str(outputs["test"]), "--report-dir", str(tmp_path / "r")])
    assert rc == 0 and (tmp_path / "r" / "drift.json").is_file()
    assert "drift: no" in capsys.readouterr().out
    assert main(["drift", str(outputs["reference"]), str(tmp_path / "missing")]) == 2
    assert "has no _SUCCESS" in capsys.readouterr().err
    assert main(["drift", str(outputs["reference"]), str(outputs["test"]), "--alpha", "2"]) == 2
    assert "--alpha 2.0 must be between 0 and 1" in capsys.readouterr().err


def test_an_unwritable_report_dir_is_one_line_before_the_comparison(outputs, tmp_path: Path, capsys,
                                                                    monkeypatch) -> None:
    from fruitpipe.drift import compare as drift

    (tmp_path / "a-file").write_text("not a folder")  # root may write anywhere: a file in the way stops anyone

    def not_reached(*args: object, **kwargs: object) -> None:
        raise AssertionError("compared before checking the report folder")

    monkeypatch.setattr(drift, "compare", not_reached)
    target = tmp_path / "a-file" / "reports"
    assert main(["drift", str(outputs["reference"]), str(outputs["test"]), "--report-dir", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"--report-dir {target} cannot be written" in err


def test_non_finite_features_in_current_are_a_finding_not_a_crash(outputs, tmp_path: Path, capsys) -> None:
    """An output embedded by a model that overflowed (before `not_finite` existed, or written by hand): its NaN rows
    are counted, left out of every test, and an alert, where SciPy used to crash with a traceback."""
    import pyarrow as pa

    broken = tmp_path / "out-broken"
    shutil.copytree(outputs["test"], broken)
    part = sorted((broken / "embeddings").glob("*.parquet"))[0]
    table = pq.read_table(part)
    feats = [list(v) for v in table.column("features").to_pylist()]
    for row in (0, 1, 2):
        feats[row][5] = float("nan")
    pq.write_table(table.set_column(table.schema.get_field_index("features"), "features",
                                    pa.array(feats, table.schema.field("features").type)), part)
    rc = main(["drift", str(outputs["reference"]), str(broken)])
    result = json.loads((broken / "drift" / "drift.json").read_text())
    assert rc == DRIFT_EXIT_CODE and result["drift"] is True
    assert result["non_finite_rows"]["current"] == 3 and result["non_finite_rows"]["reference"] == 0
    assert result["current"]["sampled"] == 97 and not result["drifted_tests"]  # the rest is the same data
    assert "3 current sampled rows hold NaN or infinite features" in capsys.readouterr().out


def test_the_tests_keep_their_false_alarm_budget_on_identical_distributions() -> None:
    """50 pairs of samples from one distribution: at alpha 0.05, at most a few alarms (the bound is 5 %); a shift
    of half a standard deviation on one component is found every time."""
    rng = np.random.default_rng(3)
    settings = DriftSettings(alpha=0.05, ks_min=0.0, mmd_min=0.0, permutations=200)
    alarms = sum(detect(rng.normal(size=(300, 8)), rng.normal(size=(200, 8)), settings)["drift"] for _ in range(50))
    assert alarms <= 6
    shifted = rng.normal(size=(200, 8)) + np.r_[0.5, np.zeros(7)]
    result = detect(rng.normal(size=(300, 8)), shifted, settings)
    assert result["drift"] and result["tests"]["components"]["drifted_components"] == [1]


def test_pca_from_projects_with_the_reference_basis(outputs, spark) -> None:
    """`reduce --pca-from`: no refit; components.npy is the reference's, byte for byte; the reduced vectors are the
    current embeddings times those components; run.json names the basis by its fingerprint; a second reduce with
    the same basis is skipped."""
    ref, cur = outputs["reference"], outputs["test"]
    assert main(["reduce", str(cur), "--pca-from", str(ref), "-q"]) == 0
    assert (cur / "pca" / "components.npy").read_bytes() == (ref / "pca" / "components.npy").read_bytes()
    components = np.load(ref / "pca" / "components.npy")
    emb = pq.read_table(cur / "embeddings").sort_by("id")
    red = pq.read_table(cur / "reduced").sort_by("id")
    x = np.stack(emb.column("features").to_numpy(zero_copy_only=False)).astype(np.float64)
    got = np.stack(red.column("pca").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, (x @ components).astype(np.float32), rtol=1e-5, atol=1e-4)
    ref_pca = json.loads((ref / "run.json").read_text())["pca"]
    report = json.loads((cur / "run.json").read_text())
    assert report["pca"]["basis"]["fingerprint"] == ref_pca["basis"]["fingerprint"]
    assert report["pca"]["basis"]["from"] == str(ref) and report["pca"]["selected_by"] == "pca_from"
    assert 0 < report["pca"]["explained_at_k_on_this_output"] <= 1 and report["pca"]["k"] == 8
    from pyspark.ml.feature import PCAModel  # the Spark ML copy holds the same basis

    np.testing.assert_array_equal(PCAModel.load(str(cur / "pca" / "spark_model")).pc.toArray(), components)
    again = fruitpipe.reduce(fruitpipe.Config(input="(from the output)", output=str(cur), pca_from=str(ref), quiet=True),
                             spark=spark)
    assert again.report["pca"]["skipped"] is True
    # refitting on its own embeddings gives another basis, and says so
    assert main(["reduce", str(cur), "-q", "--k", "8"]) == 0
    refit = json.loads((cur / "run.json").read_text())["pca"]
    assert refit["basis"]["from"] == "fitted on this output"
    assert refit["basis"]["fingerprint"] != ref_pca["basis"]["fingerprint"]


def test_pca_from_an_output_without_a_pca_is_one_line(outputs, tmp_path: Path, capsys) -> None:
    """A bad --pca-from (a typo, an output without a PCA) is refused before OUTPUT is touched: its _SUCCESS and
    commit record stay, so `train` and `drift` still read it."""
    out = outputs["test"]
    before = {p: p.read_bytes() for p in (out / "_SUCCESS", out / "run.json")}
    assert main(["reduce", str(out), "--pca-from", str(tmp_path), "-q"]) == 2
    assert "is not a complete output with a PCA" in capsys.readouterr().err
    assert main(["run", str(out.parent / "in-test"), str(out), "--pca-from", str(tmp_path / "typo"), "-q"]) == 2
    assert "is not a complete output with a PCA" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in before} == before


def test_the_drift_sample_is_the_smallest_ids_read_a_part_at_a_time(outputs) -> None:
    """sample_rows keeps only the n smallest content ids while it reads the parts one by one: the same rows as
    sorting every id of the output, and all of them when n exceeds the output."""
    import numpy as np
    import pyarrow.parquet as pq

    from fruitpipe.drift.compare import sample_rows
    from fruitpipe.output import RunDir
    from fruitpipe.storage import StorageOptions

    rundir = RunDir(str(outputs["reference"]), StorageOptions())
    table = pq.read_table(outputs["reference"] / "embeddings", columns=["id", "features"])
    table = table.take(table.column("id").to_numpy(zero_copy_only=False).argsort())
    everything = np.array(table.column("features").to_pylist(), dtype=np.float64)

    def rows(x: np.ndarray) -> list[tuple]:
        return sorted(map(tuple, x))

    x, total = sample_rows(rundir, 37)
    assert total == table.num_rows > 37 and len(rundir.files("embeddings")) > 1
    assert rows(x) == rows(everything[:37])
    x, total = sample_rows(rundir, 10_000)
    assert total == table.num_rows and rows(x) == rows(everything)
