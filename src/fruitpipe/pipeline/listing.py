"""List stage: walk a folder or prefix, derive label and split from the Fruits-360 layout, build the manifest."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pyarrow as pa

from fruitpipe import storage
from fruitpipe.errors import ConfigError
from fruitpipe.storage import StorageOptions

log = logging.getLogger(__name__)

#: Folder names that mark a split (the dataset's own spelling first).
SPLITS = {"training": "Training", "test": "Test"}

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("split", pa.string()),
        pa.field("size", pa.int64(), nullable=False),
    ]
)


@dataclass
class Listing:
    """The listed inputs (one row per file: uri, label, split, size) and the files skipped by the layout."""

    manifest: pa.Table
    ignored: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        """Number of listed inputs."""
        return self.manifest.num_rows


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


def check_input(uri: str, opts: StorageOptions) -> None:
    """Raise ConfigError, saying what to pass, if `uri` is not a folder or prefix."""
    if not storage.is_dir(storage.normalize(uri), opts):
        raise ConfigError(
            f"input {uri} is not a folder: pass a directory (or s3://bucket/prefix) holding "
            "Training/<Class>/ and Test/<Class>/ folders, or <Class>/ folders"
        )


def list_images(uri: str, opts: StorageOptions, threads: int | None = None) -> Listing:
    """List every candidate input below `uri` (`threads` > 1 fans an S3 listing out by prefix); raises
    ConfigError if `uri` is not a folder or prefix."""
    root = storage.normalize(uri)
    check_input(root, opts)
    uris: list[str] = []
    labels: list[str] = []
    splits: list[str | None] = []
    sizes: list[int] = []
    ignored: list[str] = []
    for file_uri, size in storage.list_files(root, opts, threads):
        rel = file_uri[len(root) :].lstrip("/").split("/")
        parsed = parse_layout(rel)
        if parsed is None:
            ignored.append(file_uri)
            continue
        uris.append(file_uri)
        labels.append(parsed[0])
        splits.append(parsed[1])
        sizes.append(size)
    if ignored:
        log.info("ignored %d file(s) outside class folders, e.g. %s", len(ignored), ignored[0])
    manifest = pa.table(
        {"uri": uris, "label": labels, "split": splits, "size": sizes}, schema=MANIFEST_SCHEMA
    ).sort_by("uri")
    log.info("listed %d input(s) in %d class(es) under %s", manifest.num_rows, len(set(labels)), root)
    return Listing(manifest=manifest, ignored=sorted(ignored))
