"""Production health of the batch commands: Prometheus metrics and resource use (logs are fruitpipe.logs; drift
between outputs is fruitpipe.drift)."""
