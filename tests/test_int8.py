"""--precision int8: a quantized model calibrated on the input, kept in the output, close to float32 features."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import fruitpipe
from conftest import SAMPLE, copy_classes, sample_classes
from fruitpipe.errors import ModelError, OutputError
from fruitpipe.models import quantize
from fruitpipe.models.quantize import calibration_uris


def _features(out: Path) -> dict[str, np.ndarray]:
    t = pq.read_table(out / "embeddings", columns=["uri", "features"])
    return {u: np.asarray(f, dtype=np.float64) for u, f in zip(t.column("uri").to_pylist(),
                                                               t.column("features").to_pylist())}


def test_calibration_set_is_training_evenly_spaced() -> None:
    import pyarrow as pa

    uris = [f"s3://b/Training/c/{i:03d}.jpg" for i in range(500)] + [f"s3://b/Test/c/{i}.jpg" for i in range(50)]
    manifest = pa.table({"uri": uris, "split": ["Training"] * 500 + ["Test"] * 50})
    picked = calibration_uris(manifest, 200)
    assert len(picked) == len(set(picked)) == 200 and all("/Training/" in u for u in picked)
    assert picked[0].endswith("000.jpg") and picked[-1] >= "s3://b/Training/c/497.jpg"
    flat = pa.table({"uri": ["a/1.jpg", "a/2.jpg"], "split": pa.array([None, None], pa.string())})
    assert calibration_uris(flat, 200) == ["a/1.jpg", "a/2.jpg"]  # no split folders: every image may calibrate


def test_int8_run_is_close_to_fp32_and_reuses_its_model(spark, tmp_path: Path) -> None:
    classes = sample_classes(3)
    data = copy_classes(tmp_path / "in", classes, per_split=12)
    fp32 = fruitpipe.run(fruitpipe.Config(input=str(data), output=str(tmp_path / "fp32"), k=3, quiet=True))
    int8 = fruitpipe.run(fruitpipe.Config(input=str(data), output=str(tmp_path / "int8"), k=3, quiet=True,
                                          precision="int8"))
    assert int8.counts["embedded"] == fp32.counts["embedded"] == 72
    report = json.loads((tmp_path / "int8" / "run.json").read_text())
    assert report["model"]["precision"] == "int8" and report["model"]["sha256"] != fp32.report["model"]["sha256"]
    assert report["model"]["source"].startswith("int8 of ad116e43570b")
    assert {"list", "int8_model", "embed"} <= set(report["timings_s"])
    stored = tmp_path / "int8" / "model" / "mobilenet_v2_features.int8.onnx"
    meta = json.loads((tmp_path / "int8" / "model" / "int8.json").read_text())
    # 36 Training images: 7 (a fifth) held back to check the model against float32, 29 to calibrate on
    assert stored.is_file() and meta["calibration_images"] == 29 and len(meta["check_uris"]) == 7
    assert meta["agreement"]["mean_cosine"] >= quantize.MIN_MEAN_COSINE
    assert meta["agreement"]["min_cosine"] >= quantize.MIN_MIN_COSINE
    assert meta["cpu"]["machine"] and "vnni" in meta["cpu"] and meta["scheme"] in ("u8s8", "s8s8", "u8u8")
    assert report["model"]["int8"]["agreement"] == meta["agreement"] and report["model"]["int8"]["cpu"] == meta["cpu"]
    import hashlib

    assert hashlib.sha256(stored.read_bytes()).hexdigest() == report["model"]["sha256"]

    a, b = _features(tmp_path / "fp32"), _features(tmp_path / "int8")
    a = {k[len(str(tmp_path / "in")):]: v for k, v in a.items()}
    b = {k[len(str(tmp_path / "in")):]: v for k, v in b.items()}
    assert a.keys() == b.keys()
    cos = np.array([a[k] @ b[k] / np.linalg.norm(a[k]) / np.linalg.norm(b[k]) for k in a])
    # Whatever the CPU (VNNI or not), the kept scheme agrees with float32 on every photo, not only the held-back ones
    assert cos.mean() > 0.9 and cos.min() > 0.75, (cos.mean(), cos.min(), meta["scheme"], meta["cpu"])
    assert not np.allclose(np.stack(list(a.values())), np.stack(list(b.values())), atol=1e-3)  # really int8

    # New images later: the same stored int8 model embeds them (no re-calibration on different data).
    extra = sample_classes(4)[3]
    shutil.copytree(SAMPLE / "Training" / extra, data / "Training" / extra)
    again = fruitpipe.run(fruitpipe.Config(input=str(data), output=str(tmp_path / "int8"), k=3, quiet=True,
                                           precision="int8"))
    assert again.counts["embedded_this_run"] == 60
    assert again.report["model"]["sha256"] == report["model"]["sha256"]
    kept = json.loads((tmp_path / "int8" / "model" / "int8.json").read_text())
    assert {k: v for k, v in kept.items() if k != "last_check"} == meta  # checked again on this CPU, not remade
    assert kept["last_check"]["mean_cosine"] >= quantize.MIN_MEAN_COSINE and again.report["model"]["int8"]["this_run"] == kept["last_check"]

    with pytest.raises(OutputError, match="precision"):  # float and int8 features never mix in one output
        fruitpipe.run(fruitpipe.Config(input=str(data), output=str(tmp_path / "int8"), k=3, quiet=True))


def test_int8_needs_enough_images_to_calibrate(spark, tmp_path: Path) -> None:
    data = copy_classes(tmp_path / "in", sample_classes(1), splits=("Training",), per_split=5)
    with pytest.raises(ModelError, match="at least 16"):
        fruitpipe.run(fruitpipe.Config(input=str(data), output=str(tmp_path / "out"), quiet=True, precision="int8"))


def test_without_vnni_the_non_saturating_scheme_is_chosen_and_nothing_is_written(tmp_path: Path,
                                                                                  monkeypatch) -> None:
    """The branch an AVX2-only CPU takes, run on whatever CPU CI has: U8U8 (exact integer products on every x86 CPU,
    so its agreement does not depend on the machine) is tried first and passes the check."""
    from fruitpipe.models import get_spec, resolve_model
    from fruitpipe.pipeline.listing import list_images

    monkeypatch.setattr(quantize, "cpu_features",
                        lambda: {"machine": "x86_64", "int8_flags": ["avx2"], "vnni": False})
    data = copy_classes(tmp_path / "in", sample_classes(3), splits=("Training",), per_split=12)
    manifest = list_images(str(data)).manifest
    int8 = quantize.prepare_int8_model(resolve_model(get_spec("mobilenet_v2")), manifest, str(tmp_path / "out"),
                                       10**8)
    assert int8.meta["scheme"] == "u8u8" and list(int8.meta["schemes_tried"]) == ["u8u8"]
    assert quantize.passes(int8.meta["agreement"]) and int8.meta["cpu"]["vnni"] is False
    assert int8.new_bytes and not (tmp_path / "out").exists()  # stored only once the run has claimed OUTPUT
