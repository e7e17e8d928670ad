"""fruitpipe: image collection -> ONNX embeddings -> PCA -> Parquet, on Spark (local or cluster)."""

from __future__ import annotations

__version__ = "0.1.0"

from fruitpipe.config import Config, load_config  # noqa: E402
from fruitpipe.errors import ConfigError, FruitpipeError, ModelError, OutputError  # noqa: E402
from fruitpipe.pipeline.run import RunResult  # noqa: E402
from fruitpipe.pipeline.run import run as _run  # noqa: E402


def run(config: Config) -> RunResult:
    """List, embed, reduce: the whole pipeline, committed with run.json and _SUCCESS."""
    return _run(config, ("embed", "reduce"))


def embed(config: Config) -> RunResult:
    """List and embed only (embeddings/ and rejects/)."""
    return _run(config, ("embed",))


def reduce(config: Config) -> RunResult:
    """PCA on the embeddings already in config.output (pca/ and reduced/)."""
    return _run(config, ("reduce",))


__all__ = [
    "Config", "ConfigError", "FruitpipeError", "ModelError", "OutputError", "RunResult",
    "__version__", "embed", "load_config", "reduce", "run",
]
