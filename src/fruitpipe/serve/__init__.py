"""`fruitpipe serve OUT`: the exported classifier over HTTP for phones: predict, health, Prometheus metrics."""

from typing import Any

from fruitpipe.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]


def __getattr__(name: str) -> Any:
    """`create_app` on first use: it needs FastAPI (the serve extra), the settings do not."""
    if name == "create_app":
        from fruitpipe.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'fruitpipe.serve' has no attribute {name!r}")
