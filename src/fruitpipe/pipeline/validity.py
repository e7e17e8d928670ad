"""Committed rows against the listing: which rows still describe the input (a row is kept while its file is listed
with the same size and modification time; retryable rejects are retried; rows of deleted or changed files and
duplicate rows are dropped), and the accounting that decides whether _SUCCESS may be written."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fruitpipe.output import RunDir
from fruitpipe.pipeline.listing import Listing

#: Rejects retried on every run whatever their file's stats: a permission fixed does not change the mtime.
ALWAYS_RETRIED = ("unreadable",)


@dataclass
class InvalidRows:
    """Rows to drop from the committed datasets (_file, _row of each), and how many per reason."""

    embeddings: pa.Table
    rejects: pa.Table
    by_reason: dict[str, int] = field(default_factory=dict)


def invalid_rows(emb: pa.Table, rej: pa.Table, listing: Listing, settings: dict[str, Any],
                 max_pixels: int) -> InvalidRows:
    """Decide, from the listing, which committed rows (index tables with uri, id, size, mtime_ns, _file, _row;
    rejects also reason) are no longer valid:

    - deleted: the file is no longer listed (deleted, or moved to another class or split folder);
    - changed: listed with another size or mtime (a file still being copied, replaced, fixed);
    - duplicate_row: the same uri is committed more than once (e.g. by concurrent writers of an older version);
    - retried: `unreadable` rejects, `too_large` ones when --max-pixels changed, and `duplicate` ones whose
      original is no longer embedded.
    """
    stats: dict[str, tuple[int | None, int | None]] = {}
    for table in (listing.manifest, listing.rejected):
        for u, s, m in zip(*(table.column(c).to_pylist() for c in ("uri", "size", "mtime_ns"))):
            stats[u] = (s, m)
    counts: dict[str, int] = {}
    seen: set[str] = set()

    def verdict(uri: str, size: int | None, mtime: int | None) -> str | None:
        if uri in seen:
            return "duplicate_row"
        seen.add(uri)
        if uri not in stats:
            return "deleted"
        listed_size, listed_mtime = stats[uri]
        if size is not None and mtime is not None and (size, mtime) != (listed_size, listed_mtime):
            return "changed"
        return None

    def mask(table: pa.Table, extra: Any = None) -> np.ndarray:
        cols = [table.column(c).to_pylist() for c in ("uri", "size", "mtime_ns")]
        drop = np.zeros(table.num_rows, dtype=bool)
        for i, (u, s, m) in enumerate(zip(*cols)):
            why = verdict(u, s, m) or (extra(i) if extra else None)
            if why:
                drop[i] = True
                counts[why] = counts.get(why, 0) + 1
        return drop

    drop_emb = mask(emb)
    kept_ids = {i for i, dropped in zip(emb.column("id").to_pylist(), drop_emb) if not dropped}
    reasons = rej.column("reason").to_pylist()
    ids = rej.column("id").to_pylist()
    limits_changed = settings.get("max_pixels") not in (None, max_pixels)

    def retry(i: int) -> str | None:
        reason = reasons[i]
        if reason in ALWAYS_RETRIED or (reason == "too_large" and limits_changed) \
                or (reason == "duplicate" and ids[i] not in kept_ids):
            return "retried"
        return None

    drop_rej = mask(rej, retry)
    return InvalidRows(_picked(emb, drop_emb), _picked(rej, drop_rej), dict(sorted(counts.items())))


def _picked(table: pa.Table, drop: np.ndarray) -> pa.Table:
    return table.filter(pa.array(drop, type=pa.bool_())).select(["_file", "_row"])


def accounting(rundir: RunDir, listing: Listing) -> dict[str, Any]:
    """Counts from the committed rows alone: every listed input in exactly one of embeddings or rejects."""
    final_emb = rundir.read_index("embeddings", ["uri", "id"])
    final_rej = rundir.read_index("rejects", ["uri", "reason"])
    listed = pa.concat_arrays([listing.manifest.column("uri").combine_chunks(),
                               listing.rejected.column("uri").combine_chunks()])
    emb_uris, rej_uris = final_emb.column("uri"), final_rej.column("uri")
    emb_listed = int(pc.sum(pc.is_in(emb_uris, listed)).as_py() or 0)
    rej_listed = int(pc.sum(pc.is_in(rej_uris, listed)).as_py() or 0)
    all_uris = pa.concat_arrays([emb_uris.combine_chunks(), rej_uris.combine_chunks()])
    distinct = len(pc.unique(all_uris))
    ids = final_emb.column("id")
    reasons = Counter(final_rej.column("reason").to_pylist())
    return {
        "listed": listing.count,
        "ignored_outside_class_folders": len(listing.ignored),
        "ignored": listing.skipped_by_reason(),
        "embedded": emb_listed,
        "rejected": rej_listed,
        "accounted": emb_listed + rej_listed == listing.count == distinct == len(all_uris)
        and len(pc.unique(ids)) == len(ids),
        "not_listed_anymore": len(all_uris) - emb_listed - rej_listed,
        "rejects_by_reason": dict(sorted(reasons.items())),
        "embedding_ids_digest": ids_digest(ids),
    }


def ids_digest(ids: pa.ChunkedArray | pa.Array) -> str:
    """sha256 of the sorted embedding ids: what a PCA was fitted on."""
    return hashlib.sha256("\n".join(sorted(ids.to_pylist())).encode()).hexdigest()
