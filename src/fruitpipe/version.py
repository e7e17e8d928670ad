"""The package's version (pyproject.toml's), on the ground floor: run.json, the API and the cloud artifacts name it."""

__version__ = "0.1.0"
