"""How to reach object stores: the one setting every storage call takes, on the ground floor (storage.py and
s3_objects.py both read it)."""

from __future__ import annotations

from dataclasses import dataclass

#: The one default region of every command (GDPR: the data stays in the EU): S3 for `run`, `train`, `serve`..., and
#: the cluster for `emr`.
DEFAULT_REGION = "eu-west-3"


@dataclass(frozen=True)
class StorageOptions:
    """How to reach object stores; small and picklable so Spark tasks rebuild the same filesystem."""

    s3_endpoint: str | None = None
    region: str = DEFAULT_REGION
