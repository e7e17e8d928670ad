"""Find a model file: --model-path, FRUITPIPE_MODELS=DIR, the cache, or a build from its verified public weights."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fruitpipe import download, storage
from fruitpipe.errors import ModelError
from fruitpipe.models import source
from fruitpipe.models.registry import ModelSpec

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedModel:
    """A model file on local disk, its sha256 and where it came from (model_path, models_dir, cache, built)."""

    spec: ModelSpec
    path: str
    sha256: str
    source: str

    def read_bytes(self) -> bytes:
        """The model file's bytes (what the driver broadcasts)."""
        return Path(self.path).read_bytes()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    return download.sha256_file(path)


def cache_dir() -> Path:
    """FRUITPIPE_CACHE, else $XDG_CACHE_HOME/fruitpipe/models, else ~/.cache/fruitpipe/models."""
    if os.environ.get("FRUITPIPE_CACHE"):
        return Path(os.environ["FRUITPIPE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fruitpipe" / "models"


def _fetch_from_store(spec: ModelSpec, uri: str) -> str:
    """Copy an s3:// model into the cache once (keyed by its sha256) and return the local path."""
    try:
        data = storage.read_bytes(uri)
    except OSError as exc:
        raise ModelError(f"--model-path {uri} cannot be read ({exc}): check the URI and the credentials") from None
    dest = cache_bytes(data, spec.filename)
    log.info("model %s (%d bytes) copied to %s", uri, len(data), dest)
    return str(dest)


def cache_bytes(data: bytes, filename: str) -> Path:
    """Keep model bytes in the cache under their sha256 (written once, atomically); returns the path."""
    return source.cache_file(cache_dir(), data, filename)


def resolve_model(spec: ModelSpec, model_path: str | None = None, quiet: bool = False) -> ResolvedModel:
    """Locate `spec`'s file (a local path, an s3:// URI, the models dir or the cache), or build it from its public
    weights on first use (downloaded, verified and cached)."""
    if model_path and model_path.startswith("s3://"):
        model_path = _fetch_from_store(spec, model_path)
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
    cache = cache_dir()
    published = cache / spec.sha256[:16] / spec.filename  # the published file, copied in by an earlier version
    if published.is_file() and sha256_file(published) == spec.sha256:
        return ResolvedModel(spec, str(published), spec.sha256, "cache")
    if spec.source is None:
        raise ModelError(f"model {spec.name} has no public weights fruitpipe can build it from: {spec.obtain}")
    found = source.cached_build(cache, spec.name, spec.source, spec.filename)
    if found is not None:
        return ResolvedModel(spec, str(found[0]), found[1], "cache")
    path, digest = source.build_and_cache(cache, spec.name, spec.source, spec.filename, spec.input_name,
                                          spec.output_name, quiet=quiet)
    return ResolvedModel(spec, str(path), digest, "built")
