"""A re-run with nothing to do, answered without starting Spark: when the listing is the one the last complete run
was made from (a digest of every input's uri, size and mtime), with the same settings, and the output's committed
rows are still the ones that run left, its report stands (run.json is left as it is)."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import pyarrow as pa

from fruitpipe import storage
from fruitpipe.layout import SUCCESS
from fruitpipe.output import RunDir
from fruitpipe.pipeline.bookkeeping import ALWAYS_RETRIED
from fruitpipe.version import __version__

log = logging.getLogger(__name__)

_BATCH = 65_536


def listing_digest(manifest: pa.Table, rejected: pa.Table) -> str:
    """sha256 of every listed input's uri, size and mtime (in uri order) and of the listing's own rejects, read in
    batches of the listing's columns."""
    h = hashlib.sha256()
    ordered = manifest.select(["uri", "size", "mtime_ns"]).sort_by("uri")
    for batch in ordered.to_batches(_BATCH):
        for uri, size, mtime in zip(*(batch.column(i).to_pylist() for i in range(3))):
            h.update(f"{uri}\t{size}\t{mtime}\n".encode("utf-8", "surrogateescape"))
    for uri in sorted(rejected.column("uri").to_pylist() if rejected.num_rows else []):
        h.update(f"rejected\t{uri}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def run_key(fingerprint: dict[str, Any], stages: tuple[str, ...], k: int, variance: float | None, max_pixels: int,
            listed: str) -> str:
    """What a run's result depends on: the output's fingerprint (input, model bytes), the stages, the PCA's k or
    variance, the decode limit, fruitpipe's version and the listing."""
    return hashlib.sha256(json.dumps({"fingerprint": fingerprint, "stages": list(stages), "k": k,
                                      "variance": variance, "max_pixels": max_pixels, "version": __version__,
                                      "listing": listed}, sort_keys=True).encode()).hexdigest()


def state(rundir: RunDir) -> str:
    """sha256 of the record's rows and PCA (its datasets, reduce and settings; a classifier published since does not
    count)."""
    rec = rundir.record()
    return hashlib.sha256(json.dumps({k: rec.get(k) for k in ("datasets", "reduce", "settings")},
                                     sort_keys=True).encode()).hexdigest()


def stamp(report: dict[str, Any], rundir: RunDir, key: str | None) -> None:
    """Record in `report` (run.json) what a later re-run compares with: only for a run whose inputs are all settled
    (no `unreadable` reject, which every run tries again)."""
    reasons = (report.get("counts") or {}).get("rejects_by_reason") or {}
    if key is not None and not any(reasons.get(r) for r in ALWAYS_RETRIED):
        report["up_to_date_key"] = {"run": key, "state": state(rundir)}


def previous_if_unchanged(rundir: RunDir, key: str) -> dict[str, Any] | None:
    """The last run's report when it is complete (_SUCCESS), was made from `key` and the output's rows are still
    the ones it left; else None (the run goes on as usual)."""
    if not storage.exists(rundir.join(SUCCESS)):
        return None
    try:
        previous = rundir.previous_report()
        stamped = previous.get("up_to_date_key") or {}
        if stamped.get("run") != key or stamped.get("state") != state(rundir) or rundir.consistency_problems():
            return None  # another run's key, rows changed since, or files missing or added beside the record
    except Exception:  # an unreadable run.json or record: the full run repairs or explains it
        return None
    return previous


def unchanged_counts(previous: dict[str, Any]) -> dict[str, Any]:
    """The last run's counts of the output (listed, embedded, rejected, ...) with this run's own: nothing embedded,
    rejected or dropped, every input already done, no inference."""
    return {**previous, "embedded_this_run": 0, "rejected_this_run": 0, "not_listed_anymore": 0,
            "dropped_before_embedding": {}, "skipped_already_done": previous.get("listed", 0),
            "inference": {k: 0 for k in (previous.get("inference") or {})}}


def unchanged_report(previous: dict[str, Any], token: str, started: float, timings: dict[str, float]
                     ) -> dict[str, Any]:
    """run.json of a run that found nothing to do: the last run's report (its output, model, PCA, the key a later
    re-run compares with) with this run's id, time, counts and timings; the PCA kept, not refitted."""
    pca = previous.get("pca")
    return {**previous, "run_id": token,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "up_to_date": {"since_run": (previous.get("up_to_date") or {}).get("since_run") or previous.get("run_id")},
            "counts": unchanged_counts(previous.get("counts") or {}),
            "pca": {**pca, "skipped": True} if isinstance(pca, dict) else pca,
            "timings_s": {k: round(v, 3) for k, v in timings.items()}}
