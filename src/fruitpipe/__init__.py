"""fruitpipe: image collection -> ONNX embeddings -> PCA -> Parquet, on Spark (local or cluster)."""

from __future__ import annotations

from typing import Any

from fruitpipe.config import Config, load_config  # noqa: E402
from fruitpipe.errors import ConfigError, FruitpipeError, ModelError, OutputError  # noqa: E402
from fruitpipe.pipeline.run import RunResult  # noqa: E402
from fruitpipe.pipeline.run import run as _run  # noqa: E402
from fruitpipe.version import __version__  # noqa: E402


def run(config: Config, spark: Any = None) -> RunResult:
    """List, embed, reduce: the whole pipeline, committed with run.json and _SUCCESS.

    `spark`: an existing SparkSession (a notebook's, EMR Studio's) to run on; fruitpipe never stops a session it
    did not start. Without it, the active session is used if there is one, else one is started and stopped."""
    return _run(config, ("embed", "reduce"), session=spark)


def embed(config: Config, spark: Any = None) -> RunResult:
    """List and embed only (embeddings/ and rejects/); `spark` as in run()."""
    return _run(config, ("embed",), session=spark)


def reduce(config: Config, spark: Any = None) -> RunResult:
    """PCA on the embeddings already in config.output (pca/ and reduced/); `spark` as in run()."""
    return _run(config, ("reduce",), session=spark)


__all__ = [
    "Config", "ConfigError", "FruitpipeError", "ModelError", "OutputError", "RunResult",
    "__version__", "embed", "load_config", "reduce", "run",
]
