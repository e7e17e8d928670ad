"""Model registry, regression values from MODELS.md, one session per process, verified download."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from fruitpipe.errors import ConfigError, ModelError
from fruitpipe.models import get_spec, make_predict_fn, resolve_model, runner
from conftest import MODELS


def _synthetic() -> np.ndarray:
    """MODELS.md's regression input: x[n,h,w,c] = ((7h + 3w + 50c + 101n) mod 256) / 127.5 - 1."""
    n, h, w, c = np.meshgrid(np.arange(2), np.arange(224), np.arange(224), np.arange(3), indexing="ij")
    return (((7 * h + 3 * w + 50 * c + 101 * n) % 256) / 127.5 - 1.0).astype(np.float32)


def test_unknown_model_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match="mobilenet_v2") as info:
        get_spec("resnet9000")
    assert "efficientnet_lite0" in str(info.value)


@pytest.mark.parametrize(
    "name, norms, first",
    [("mobilenet_v2", (35.6115, 35.9471), [0.0, 4.66755, 2.00691, 0.0]), ("efficientnet_lite0", (17.9776, 17.9392), None)],
)
def test_regression_values(name: str, norms: tuple[float, float], first: list[float] | None) -> None:
    spec = get_spec(name)
    model = resolve_model(spec)
    assert model.sha256 == spec.sha256 and model.source == "models_dir"
    predict = make_predict_fn(model.sha256, model.read_bytes, threads=1)
    feats = predict(_synthetic())
    assert feats.shape == (2, spec.dim)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), norms, atol=1e-3)
    if first:
        np.testing.assert_allclose(feats[0, :4], first, atol=1e-3)


def test_session_is_built_once_per_process() -> None:
    model = resolve_model(get_spec("mobilenet_v2"))
    loads = []

    def load() -> bytes:
        loads.append(1)
        return model.read_bytes()

    for _ in range(3):  # three "tasks" in one worker, each making its own predict function
        make_predict_fn(model.sha256 + "-once", load, threads=1)(np.zeros((1, 224, 224, 3), np.float32))
    assert runner.SESSIONS_BUILT[model.sha256 + "-once"] == 1
    assert len(loads) == 1


# ---- download -------------------------------------------------------------------------------------------


def test_a_published_file_in_the_cache_is_used(no_local_models: Path) -> None:
    """The published ONNX file, kept in the cache under its sha256 (as earlier versions did), needs no build."""
    spec = get_spec("mobilenet_v2")
    dest = no_local_models / spec.sha256[:16] / spec.filename
    dest.parent.mkdir(parents=True)
    shutil.copyfile(MODELS / spec.filename, dest)
    got = resolve_model(spec)
    assert got.source == "cache" and got.path == str(dest) and got.sha256 == spec.sha256


def test_unreachable_host_gives_clear_error(no_local_models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port held by this test and never listened on: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        monkeypatch.setenv("FRUITPIPE_DOWNLOAD_BASE", f"http://127.0.0.1:{port}")
        with pytest.raises(ModelError, match="FRUITPIPE_MODELS") as info:
            resolve_model(get_spec("mobilenet_v2"), quiet=True)
    assert "after 5 attempts" in str(info.value) and "\n" not in str(info.value)
    assert not [p for p in no_local_models.rglob("*") if p.is_file()]


def test_models_dir_with_wrong_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mobilenet_v2_features.onnx").write_bytes(b"not a model")
    monkeypatch.setenv("FRUITPIPE_MODELS", str(tmp_path))
    with pytest.raises(ModelError, match="sha256"):
        resolve_model(get_spec("mobilenet_v2"))


def test_model_path_is_used_as_given() -> None:
    path = str(MODELS / "mobilenet_v2_features.onnx")
    got = resolve_model(get_spec("mobilenet_v2"), model_path=path)
    assert got.source == "model_path" and got.path == os.path.abspath(path)


def test_cuda_request_falls_back_to_cpu_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    import onnxruntime as ort

    from fruitpipe.models.runner import providers_for

    assert providers_for("cpu") == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert providers_for("cuda")[0] == "CUDAExecutionProvider"
    else:  # the CPU-only wheel, as in CI
        with caplog.at_level("WARNING", logger="fruitpipe.models.runner"):
            assert providers_for("cuda") == ["CPUExecutionProvider"]
        assert "onnxruntime-gpu" in caplog.text
        assert providers_for("auto") == ["CPUExecutionProvider"]
        assert providers_for("cuda", gpu_id=1) == ["CPUExecutionProvider"]


def test_task_gpu_is_the_address_spark_assigned() -> None:
    """Under Spark GPU scheduling (spark.task.resource.gpu.amount) each task runs on the GPU it was given."""
    from pyspark.resource import ResourceInformation

    from fruitpipe.models.runner import task_gpu

    assert task_gpu({}) is None  # no GPU scheduling: CUDA's default device
    assert task_gpu({"gpu": ResourceInformation("gpu", ["3"])}) == 3
    assert task_gpu({"gpu": ResourceInformation("gpu", [])}) is None
    assert task_gpu({"fpga": ResourceInformation("fpga", ["0"])}) is None


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite0"])
def test_the_uint8_wrapped_model_gives_todays_features(name: str) -> None:
    """The scaling moved into the graph: fed the decoded uint8 pixels, the wrapped model returns the float model's
    features on real photos of the sample (the same float32 operations, so within float rounding)."""
    import onnxruntime as ort

    from conftest import SAMPLE
    from fruitpipe import images
    from fruitpipe.models.wrap import UINT8_INPUT, wrap_uint8

    spec = get_spec(name)
    raw = (MODELS / spec.filename).read_bytes()
    wrapped = wrap_uint8(raw, spec)
    photos = [p.read_bytes() for p in sorted(SAMPLE.glob("Test/*/*.jpg"))[::40]]
    pixels = np.stack([images.model_pixels(p, spec.input_size, 10**8) for p in photos])
    assert pixels.dtype == np.uint8 and pixels.shape == (len(photos), spec.input_size, spec.input_size, 3)
    floats = np.stack([images.model_input(p, spec.input_size, 10**8) for p in photos])
    cpu = ["CPUExecutionProvider"]
    expected = ort.InferenceSession(raw, providers=cpu).run([spec.output_name], {spec.input_name: floats})[0]
    got = ort.InferenceSession(wrapped.data, providers=cpu).run([spec.output_name], {UINT8_INPUT: pixels})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert wrapped.sha256 != get_spec(name).sha256  # sessions are cached by the wrapped file's own sha256
