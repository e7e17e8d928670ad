"""Production health: JSON logs with the run id, Prometheus metrics of batch runs, resource use, drift."""
