"""`fruitpipe serve OUT`: the exported classifier over HTTP for phones: predict, health, Prometheus metrics."""

from fruitpipe.serve.app import ServeSettings, create_app

__all__ = ["ServeSettings", "create_app"]
