"""List stage: walk a folder or prefix, derive label and split from the Fruits-360 layout, build the manifest."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from fruitpipe import schemas, storage
from fruitpipe.errors import ConfigError
from fruitpipe.images import REASONS

log = logging.getLogger(__name__)

#: Folder names that mark a split (the dataset's own spelling first).
SPLITS = {"training": "Training", "test": "Test"}

MANIFEST_SCHEMA = schemas.MANIFEST_SCHEMA
#: The rejects' detail for what the listing itself rejects.
_DETAILS = {"bad_name": "the file name is not valid UTF-8: rename it (shown with \\x escapes)",
            "empty_folder": "the path has an empty folder name ('//'), so its class cannot be read: rename it"}


@dataclass
class Listing:
    """The listed inputs (one row per file: uri, label, split, size, mtime_ns), the files skipped by the layout,
    the paths not listed and why (links, FIFOs), and listed files that are rejected as listed (bad names)."""

    manifest: pa.Table
    ignored: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: Rejects decided by the listing itself (REJECTS_SCHEMA rows): names that are not UTF-8 or have an empty folder.
    rejected: pa.Table = field(default_factory=schemas.REJECTS_SCHEMA.empty_table)

    @property
    def count(self) -> int:
        """Number of listed inputs (including those rejected by the listing)."""
        return self.manifest.num_rows + self.rejected.num_rows

    def skipped_by_reason(self) -> dict[str, int]:
        """How many paths were not listed, per reason (storage.IGNORED_REASONS)."""
        return _by_reason(self.skipped)


def _by_reason(skipped: list[tuple[str, str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, reason in skipped:
        counts[reason] = counts.get(reason, 0) + 1
    return dict(sorted(counts.items()))


def parse_layout(rel_parts: list[str]) -> tuple[str, str | None] | None:
    """(label, split) for a path relative to the root, or None if the file is not in a class folder.

    `Training/<Class>/<file>` and `Test/<Class>/<file>` give split and label; `<Class>/<file>` gives a label and
    no split. Hidden files and folders (".DS_Store", "._x") and files at the root are not inputs. The image
    type is decided later from the content, never from the extension.
    """
    if any(p.startswith(".") for p in rel_parts):
        return None
    if len(rel_parts) >= 3 and rel_parts[0].lower() in SPLITS:
        return rel_parts[1], SPLITS[rel_parts[0].lower()]
    if len(rel_parts) >= 2 and rel_parts[0].lower() not in SPLITS:
        return rel_parts[0], None
    return None


def check_input(uri: str) -> None:
    """Raise ConfigError, saying what to pass, if `uri` is not a folder or prefix."""
    if not storage.is_dir(storage.normalize(uri)):
        raise ConfigError(
            f"input {uri} is not a folder: pass a directory (or s3://bucket/prefix) holding "
            "Training/<Class>/ and Test/<Class>/ folders, or <Class>/ folders"
        )


def list_images(uri: str, threads: int | None = None) -> Listing:
    """List every candidate input below `uri` (`threads` > 1 fans an S3 listing out by prefix); raises
    ConfigError if `uri` is not a folder or prefix."""
    root = storage.normalize(uri)
    check_input(root)
    rows: dict[str, list] = {"uri": [], "label": [], "split": [], "size": [], "mtime_ns": []}
    bad: dict[str, list] = {"uri": [], "label": [], "split": [], "size": [], "mtime_ns": []}
    ignored: list[str] = []
    reasons: list[str] = []
    entries, skipped = storage.walk_input(root, threads=threads)
    for entry in entries:
        rel = entry.uri[len(root) :].lstrip("/").split("/")
        parsed = parse_layout(rel)
        if parsed is None:
            ignored.append(entry.uri)
            continue
        problem = entry.problem or ("empty_folder" if "" in rel[:-1] else None)  # "Training//x.jpg": no class
        target = bad if problem else rows
        for key, value in zip(target, (entry.uri, parsed[0], parsed[1], entry.size, entry.mtime_ns)):
            target[key].append(value)
        if problem:
            reasons.append(problem)
    if ignored:
        log.info("ignored %d file(s) outside class folders, e.g. %s", len(ignored), ignored[0])
    if skipped:
        log.warning("not listed: %s", ", ".join(f"{n} {r}" for r, n in _by_reason(skipped).items()))
    manifest = pa.table(rows, schema=MANIFEST_SCHEMA).sort_by("uri")
    n_bad = len(bad["uri"])
    for reason, n in sorted(Counter(reasons).items()):
        log.warning("%d file(s) are recorded as rejects (%s: %s), e.g. %s", n, reason, REASONS[reason],
                    bad["uri"][reasons.index(reason)])
    rejected = pa.table({**bad, "id": [None] * n_bad, "reason": reasons, "detail": [_DETAILS[r] for r in reasons]},
                        schema=schemas.REJECTS_SCHEMA)
    log.info("listed %d input(s) in %d class(es) under %s", manifest.num_rows + n_bad, len(set(rows["label"])), root)
    return Listing(manifest=manifest, ignored=sorted(ignored), skipped=skipped, rejected=rejected)
