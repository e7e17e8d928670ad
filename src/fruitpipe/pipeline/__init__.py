"""Pipeline stages (one a module) and the functions that run them: run (all), embed, reduce."""

from __future__ import annotations

from fruitpipe.config import Config
from fruitpipe.pipeline.run import RunResult, run as _run


def run(config: Config) -> RunResult:
    """List, embed, reduce: the whole pipeline, committed with run.json and _SUCCESS."""
    return _run(config, ("embed", "reduce"))


def embed(config: Config) -> RunResult:
    """List and embed only (embeddings/ and rejects/)."""
    return _run(config, ("embed",))


def reduce(config: Config) -> RunResult:
    """PCA on the embeddings already in config.output (pca/ and reduced/)."""
    return _run(config, ("reduce",))


__all__ = ["RunResult", "embed", "reduce", "run"]
