"""Find a model file: --model-path, FRUITPIPE_MODELS=DIR, the cache, or a verified download into the cache."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fruitpipe.errors import ModelError
from fruitpipe.models.registry import DEFAULT_BASE_URL, ModelSpec

if TYPE_CHECKING:
    from fruitpipe.storage import StorageOptions

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


@dataclass(frozen=True)
class ResolvedModel:
    """A model file on local disk, its sha256 and where it came from (path, models_dir, cache, download)."""

    spec: ModelSpec
    path: str
    sha256: str
    source: str

    def read_bytes(self) -> bytes:
        """The model file's bytes (what the driver broadcasts)."""
        return Path(self.path).read_bytes()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_dir() -> Path:
    """FRUITPIPE_CACHE, else $XDG_CACHE_HOME/fruitpipe/models, else ~/.cache/fruitpipe/models."""
    if os.environ.get("FRUITPIPE_CACHE"):
        return Path(os.environ["FRUITPIPE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fruitpipe" / "models"


def download(url: str, dest: Path, sha256: str, timeout: float = 60.0) -> None:
    """Stream `url` to a temporary file beside `dest`, verify sha256, then rename; a bad file never lands."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (pinned https URL)
                    for chunk in iter(lambda: resp.read(_CHUNK), b""):
                        h.update(chunk)
                        out.write(chunk)
            except (urllib.error.URLError, OSError) as exc:
                raise ModelError(
                    f"could not download {url} ({exc}); set FRUITPIPE_MODELS=DIR or pass --model-path FILE"
                ) from None
        if h.hexdigest() != sha256:
            raise ModelError(
                f"{url} has sha256 {h.hexdigest()}, expected {sha256}; the file was discarded "
                "(a corrupt download or a wrong mirror: retry, or set FRUITPIPE_MODEL_BASE_URL)"
            )
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fetch_from_store(spec: ModelSpec, uri: str, opts: StorageOptions) -> str:
    """Copy an s3:// model into the cache once (keyed by its sha256) and return the local path."""
    from fruitpipe import storage

    try:
        data = storage.read_bytes(uri, opts)
    except OSError as exc:
        raise ModelError(f"--model-path {uri} cannot be read ({exc}): check the URI and the credentials") from None
    dest = cache_bytes(data, spec.filename)
    log.info("model %s (%d bytes) copied to %s", uri, len(data), dest)
    return str(dest)


def cache_bytes(data: bytes, filename: str) -> Path:
    """Keep model bytes in the cache under their sha256 (written once, atomically); returns the path."""
    dest = cache_dir() / hashlib.sha256(data).hexdigest()[:16] / filename
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, dest)
    return dest


def resolve_model(spec: ModelSpec, model_path: str | None = None,
                  opts: StorageOptions | None = None) -> ResolvedModel:
    """Locate `spec`'s file (a local path, an s3:// URI, the models dir or the cache), downloading if needed."""
    if model_path and model_path.startswith("s3://"):
        from fruitpipe.storage import StorageOptions

        model_path = _fetch_from_store(spec, model_path, opts or StorageOptions())
    if model_path:
        if not os.path.isfile(model_path):
            raise ModelError(f"--model-path {model_path} is not a file: point it at a local .onnx file")
        digest = sha256_file(model_path)
        if spec.sha256 and digest != spec.sha256:
            log.info("model file %s has sha256 %s, not the registry's %s for %s (custom weights; run.json records it)",
                        model_path, digest, spec.sha256, spec.name)
        return ResolvedModel(spec, os.path.abspath(model_path), digest, "model_path")
    models_dir = os.environ.get("FRUITPIPE_MODELS")
    if models_dir:
        candidate = Path(models_dir) / spec.filename
        if not candidate.is_file():
            raise ModelError(f"FRUITPIPE_MODELS={models_dir} has no {spec.filename}: fix the variable or unset it")
        digest = sha256_file(candidate)
        if digest != spec.sha256:
            raise ModelError(f"{candidate} has sha256 {digest}, expected {spec.sha256}: replace the file")
        return ResolvedModel(spec, str(candidate.resolve()), digest, "models_dir")
    cached = cache_dir() / spec.sha256[:16] / spec.filename
    if cached.is_file():
        if sha256_file(cached) == spec.sha256:
            return ResolvedModel(spec, str(cached), spec.sha256, "cache")
        log.warning("cached %s fails its sha256 check; downloading it again", cached)
        cached.unlink()
    url = spec.url(os.environ.get("FRUITPIPE_MODEL_BASE_URL") or DEFAULT_BASE_URL)
    log.info("downloading %s (%d bytes) to %s", url, spec.size_bytes, cached)
    download(url, cached, spec.sha256)
    return ResolvedModel(spec, str(cached), spec.sha256, "download")
