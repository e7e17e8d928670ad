"""fruitpipe: image collection -> ONNX embeddings -> PCA -> Parquet, on Spark (local or cluster)."""

from __future__ import annotations

__version__ = "0.1.0"

from fruitpipe.config import Config, load_config  # noqa: E402
from fruitpipe.errors import ConfigError, FruitpipeError, ModelError, OutputError  # noqa: E402
from fruitpipe.pipeline import RunResult, embed, reduce, run  # noqa: E402

__all__ = [
    "Config", "ConfigError", "FruitpipeError", "ModelError", "OutputError", "RunResult",
    "__version__", "embed", "load_config", "reduce", "run",
]
