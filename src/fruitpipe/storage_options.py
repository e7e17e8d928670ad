"""How to reach object stores: the one setting every storage call takes, on the ground floor (storage.py and
s3_objects.py both read it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StorageOptions:
    """How to reach object stores; small and picklable so Spark tasks rebuild the same filesystem."""

    s3_endpoint: str | None = None
    region: str = "eu-west-3"
