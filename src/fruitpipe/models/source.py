"""A backbone from its public source: the published weight files (pinned by commit, size and sha256) fetched once,
the ONNX graph built from them, checked against MODELS.md's regression values, and cached under its own sha256."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from fruitpipe import download
from fruitpipe.errors import ModelError
from fruitpipe.models.build_mobilenet_v2 import build_features_model, folder_loader

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightsSource:
    """Where a backbone's weights are published and how the graph is built from them."""

    #: Folder on download.PUBLIC_HOST, naming a commit (the folder was deleted from the default branch).
    host_dir: str
    #: Package resource (in fruitpipe.models) listing every file: name, sha256, bytes.
    manifest: str
    #: sha256 of all the files concatenated in sorted-name order (MODELS.md): the set as a whole.
    digest: str
    #: Regression values of MODELS.md on regression_input(): the L2 norms of both rows and row 0's first features.
    norms: tuple[float, ...]
    first: tuple[float, ...]
    #: Bumped when the builder changes the bytes it writes, so that a cached build is not taken for the new one.
    build_version: int = 1
    #: Tolerance of the regression check (MODELS.md: about 1e-3).
    atol: float = 1e-3

    def files(self) -> list[download.PinnedFile]:
        """The pinned weight files, from the manifest shipped in the package."""
        text = resources.files("fruitpipe.models").joinpath(self.manifest).read_text(encoding="utf-8")
        rows = [line.split("\t") for line in text.splitlines()[1:] if line.strip()]
        return [download.PinnedFile(f"{self.host_dir}/{name}", name, sha, int(size)) for name, sha, size in rows]


def regression_input() -> np.ndarray:
    """MODELS.md's synthetic input: x[n,h,w,c] = ((7h + 3w + 50c + 101n) mod 256) / 127.5 - 1, shape [2,224,224,3]."""
    n, h, w, c = np.meshgrid(np.arange(2), np.arange(224), np.arange(224), np.arange(3), indexing="ij")
    return (((7 * h + 3 * w + 50 * c + 101 * n) % 256) / 127.5 - 1.0).astype(np.float32)


def check_regression(model_bytes: bytes, source: WeightsSource, input_name: str, output_name: str) -> list[float]:
    """Run the model on regression_input() and compare with the published values; ModelError if they differ."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    feats = session.run([output_name], {input_name: regression_input()})[0]
    norms = np.linalg.norm(feats, axis=1)
    ok = (np.allclose(norms, source.norms, atol=source.atol)
          and np.allclose(feats[0, : len(source.first)], source.first, atol=source.atol))
    if not ok:
        raise ModelError(f"the model built from {source.host_dir} gives norms {np.round(norms, 4).tolist()} on the "
                         f"regression input, published {list(source.norms)}: not cached (report this as a bug)")
    return [round(float(v), 5) for v in norms]


def _concat_digest(folder: Path, files: list[download.PinnedFile]) -> str:
    h = hashlib.sha256()
    for pinned in sorted(files, key=lambda p: p.dest):
        h.update((folder / pinned.dest).read_bytes())
    return h.hexdigest()


def pointer_path(cache: Path, name: str, source: WeightsSource) -> Path:
    """The small record that names the cached build of `name` from `source` (file and sha256)."""
    return cache / "built" / f"{name}-{source.digest[:16]}-b{source.build_version}.json"


def cached_build(cache: Path, name: str, source: WeightsSource, filename: str) -> tuple[Path, str] | None:
    """The cached build (path, sha256) if its record exists and the file still has the recorded sha256."""
    pointer = pointer_path(cache, name, source)
    try:
        record = json.loads(pointer.read_text())
        path = cache / record["sha256"][:16] / filename
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if path.is_file() and download.sha256_file(path) == record["sha256"]:
        return path, record["sha256"]
    log.warning("the cached build %s fails its sha256 check; building it again", path)
    return None


def build_and_cache(cache: Path, name: str, source: WeightsSource, filename: str, input_name: str,
                    output_name: str, quiet: bool = False) -> tuple[Path, str]:
    """Fetch the weights (resuming what an earlier try fetched), build, check, cache; returns (path, sha256)."""
    files = source.files()
    weights = cache / "weights" / f"{name}-{source.digest[:16]}"
    log.info("%s: first use, building it from its published weights (%d files, %.1f MB, from %s/%s)", name,
             len(files), sum(p.size for p in files) / 1e6, download.base_url(), source.host_dir)
    try:
        download.fetch_all(files, weights, desc=f"{name} weights", quiet=quiet)
    except download.DownloadError as exc:
        raise ModelError(f"{exc} (or set FRUITPIPE_MODELS=DIR / pass --model-path FILE)") from None
    if _concat_digest(weights, files) != source.digest:
        raise ModelError(f"the weight files of {name} do not add up to the pinned set {source.digest[:16]}...: "
                         f"remove {weights} and retry")
    data = build_features_model(folder_loader(weights), input_name, output_name)
    norms = check_regression(data, source, input_name, output_name)
    sha = hashlib.sha256(data).hexdigest()
    path = cache_file(cache, data, filename)
    pointer = pointer_path(cache, name, source)
    pointer.parent.mkdir(parents=True, exist_ok=True)
    record = {"model": name, "sha256": sha, "bytes": len(data), "weights": source.host_dir,
              "weights_sha256": source.digest, "build_version": source.build_version, "regression_norms": norms}
    _write_atomic(pointer, (json.dumps(record, indent=1, allow_nan=False) + "\n").encode())
    shutil.rmtree(weights, ignore_errors=True)  # the built file is what is needed from here on
    try:
        weights.parent.rmdir()
    except OSError:
        pass  # another model's weights are still being fetched there
    log.info("%s built and checked against its regression values (sha256 %s..., %d bytes): %s", name, sha[:16],
             len(data), path)
    return path, sha


def cache_file(cache: Path, data: bytes, filename: str) -> Path:
    """Keep bytes in the cache under their own sha256 (written once, atomically); returns the path."""
    dest = cache / hashlib.sha256(data).hexdigest()[:16] / filename
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(dest, data)
    return dest


def _write_atomic(dest: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
