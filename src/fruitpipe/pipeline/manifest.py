"""Input lists (--input-list): a Parquet or CSV file, or a folder of them, of image URIs with optional label, split,
size and modification time; or an S3 Inventory report as AWS writes it (its manifest.json, or the folder holding
it: headerless CSV, ORC or Parquet data files, URL-encoded CSV keys). Read by the executors; the driver reads only
the schema."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from pyarrow import orc

from fruitpipe import storage
from fruitpipe.errors import ConfigError, OutputError
from fruitpipe.pipeline.frames import files_frame, output_errors, stage
from fruitpipe.pipeline.listing import SPLITS, Listing
from fruitpipe.schemas import MANIFEST_SCHEMA, REJECTS_SCHEMA
from fruitpipe.spark import from_arrow, to_arrow

log = logging.getLogger(__name__)

FORMATS = (".parquet", ".csv", ".csv.gz", ".orc")
INVENTORY_MANIFEST = "manifest.json"
_HOW = ("a Parquet or CSV file (or a folder of them) with a `uri` column (or S3 Inventory's `bucket` and `key`), "
        "and optionally label, split, size, mtime_ns; or an S3 Inventory report's manifest.json")
#: `<split>/<label>/<file>` or `<label>/<file>` at the end of a URI, when the list gives no label or split.
_LAYOUT = r"(?:^|/)(?:(?P<split>[^/]+)/)?(?P<label>[^/]+)/[^/]+$"
_SCHEME = r"^[A-Za-z][A-Za-z0-9+.-]*://"
_BATCH = 65_536


@dataclass(frozen=True)
class ListSource:
    """The files of an input list and how to read them."""

    files: tuple[str, ...]
    #: Column names of headerless CSV files (an S3 Inventory's fileSchema); None: each CSV has its header.
    csv_columns: tuple[str, ...] | None = None
    #: S3 Inventory CSV files URL-encode object keys.
    url_encoded_keys: bool = False
    #: Relative local paths in a `uri` column are resolved against this folder (the driver's working directory
    #: when the list was read), once, so the output stores absolute URIs.
    base: str | None = None


def _snake(name: str) -> str:
    """fileSchema's CSV names ("LastModifiedDate", "ETag") as AWS names the ORC/Parquet columns."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name.strip()).lower()


def _inventory(uri: str) -> ListSource:
    """The data files an S3 Inventory manifest.json names, as AWS lays them out: `files[].key` in the destination
    bucket; for a downloaded copy (a local manifest), the same keys below the report's folder."""
    try:
        doc = json.loads(storage.read_bytes(uri))
        fmt = str(doc["fileFormat"]).upper()
        keys = [str(f["key"]) for f in doc["files"]]
        schema = str(doc.get("fileSchema", ""))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--input-list {uri} is not an S3 Inventory manifest ({type(exc).__name__}: "
                          f"{str(exc)[:120]}): pass {_HOW}") from None
    if fmt not in ("CSV", "ORC", "PARQUET"):
        raise ConfigError(f"--input-list {uri}: inventory format {doc['fileFormat']!r} is not CSV, ORC or Parquet")
    if not keys:
        raise ConfigError(f"--input-list {uri} names no data files: the inventory report is empty")
    columns = tuple(_snake(c) for c in schema.split(",")) if fmt == "CSV" else None
    if columns is not None and not {"bucket", "key"} <= set(columns):
        raise ConfigError(f"--input-list {uri}: the inventory's fileSchema has no Bucket and Key ({schema[:120]})")
    if storage.is_s3(uri):
        dest = str(doc.get("destinationBucket", "")).rsplit(":", 1)[-1] or uri[len("s3://"):].split("/", 1)[0]
        files = [f"s3://{dest}/{k}" for k in keys]
    else:  # <report>/<timestamp>/manifest.json beside <report>/data/...: keys are "<prefix>/<bucket>/<id>/data/..."
        report = os.path.dirname(os.path.dirname(storage.normalize(uri)))
        marker = f"{doc.get('sourceBucket', '')}/{os.path.basename(report)}/"
        files = [storage.join(report, k.split(marker, 1)[1] if marker in k else f"data/{k.rsplit('/', 1)[-1]}")
                 for k in keys]
    log.info("S3 Inventory %s: %d %s data file(s)", uri, len(files), fmt)
    return ListSource(tuple(files), columns, url_encoded_keys=fmt == "CSV")


def list_files(uri: str) -> ListSource:
    """The list's files: `uri` itself, the Parquet/CSV/ORC files below a folder, or those an S3 Inventory's
    manifest.json names; ConfigError saying what to pass."""
    uri = storage.normalize(uri)
    base = None if storage.is_s3(uri) else os.getcwd()
    if storage.is_dir(uri):
        if storage.exists(storage.join(uri, INVENTORY_MANIFEST)):
            return _inventory(storage.join(uri, INVENTORY_MANIFEST))
        files = sorted(u for u, _ in storage.list_files(uri) if u.lower().endswith(FORMATS))
        if not files:
            raise ConfigError(f"--input-list {uri} is a folder without .parquet or .csv files: pass {_HOW}")
        return ListSource(tuple(files), base=base)
    if not storage.exists(uri):
        raise ConfigError(f"--input-list {uri} does not exist: pass {_HOW}")
    if uri.rsplit("/", 1)[-1] == INVENTORY_MANIFEST:
        return _inventory(uri)
    if not uri.lower().endswith(FORMATS):
        raise ConfigError(f"--input-list {uri} is neither .parquet nor .csv: pass {_HOW}")
    return ListSource((uri,), base=base)


def _csv_options(source: ListSource) -> dict[str, Any]:
    # Every column as text: a class named "1" stays a label, and sizes are parsed below.
    names = list(source.csv_columns) if source.csv_columns else None
    types = {n: t for n, t in _CSV_TYPES.items() if names is None or n in names}
    if names:  # an inventory: every other column read as text too (version ids, ETags), never inferred
        types = {**{n: pa.string() for n in names}, **types}
    return {"convert_options": pacsv.ConvertOptions(strings_can_be_null=True, column_types=types),
            "read_options": pacsv.ReadOptions(block_size=8 << 20, column_names=names)}


def _batches(uri: str, source: ListSource) -> Iterator[pa.RecordBatch]:
    """The file's rows, a batch at a time (memory flat in the file's size)."""
    fs, path = storage.resolve(uri)
    lower = uri.lower()
    if lower.endswith(".parquet"):
        with fs.open_input_file(path) as fh:
            yield from pq.ParquetFile(fh).iter_batches(batch_size=_BATCH)
        return
    if lower.endswith(".orc"):
        with fs.open_input_file(path) as fh:
            f = orc.ORCFile(fh)
            for i in range(f.nstripes):  # a stripe is AWS's unit, tens of MB at most
                yield f.read_stripe(i)
        return
    compression = "gzip" if lower.endswith(".gz") else None
    with fs.open_input_stream(path, compression=compression) as fh:
        yield from pacsv.open_csv(fh, **_csv_options(source))


_CSV_TYPES = {"uri": pa.string(), "bucket": pa.string(), "key": pa.string(), "label": pa.string(),
              "split": pa.string(), "size": pa.int64(), "mtime_ns": pa.int64()}


def columns_of(uri: str, source: ListSource | None = None) -> list[str]:
    """Column names of one list file (a Parquet or ORC footer, a CSV header or the inventory's fileSchema)."""
    if source is not None and source.csv_columns and uri.lower().endswith((".csv", ".csv.gz")):
        return list(source.csv_columns)
    fs, path = storage.resolve(uri)
    try:
        if uri.lower().endswith(".parquet"):
            with fs.open_input_file(path) as fh:
                return list(pq.ParquetFile(fh).schema_arrow.names)
        if uri.lower().endswith(".orc"):
            with fs.open_input_file(path) as fh:
                return list(orc.ORCFile(fh).schema.names)
        compression = "gzip" if uri.lower().endswith(".gz") else None
        with fs.open_input_stream(path, compression=compression) as fh:
            return list(pacsv.open_csv(fh).schema.names)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ConfigError(f"--input-list {uri} cannot be read ({str(exc)[:120]}): pass {_HOW}") from None


def check(source: ListSource) -> None:
    """ConfigError unless each file names its images (a `uri` column, or `bucket` and `key`)."""
    for uri in source.files:
        names = set(columns_of(uri, source))
        if "uri" not in names and not {"bucket", "key"} <= names:
            raise ConfigError(f"--input-list {uri} has no `uri` column (columns: {', '.join(sorted(names)) or 'none'})"
                              f": pass {_HOW}")


def _absolute(uri: pa.ChunkedArray, base: str) -> pa.ChunkedArray:
    """Relative local paths joined to `base` and normalised; URIs and absolute paths as they are."""
    relative = pc.invert(pc.or_(pc.match_substring_regex(uri, _SCHEME), pc.starts_with(uri, "/")))
    if not pc.any(pc.fill_null(relative, False)).as_py():
        return uri
    return pa.chunked_array([pa.array(
        [os.path.normpath(os.path.join(base, u)) if rel and u else u
         for u, rel in zip(uri.to_pylist(), relative.to_pylist())], pa.string())])


def _deleted(t: pa.Table) -> pa.ChunkedArray | None:
    """Rows an inventory lists that are no object to read: delete markers and older versions."""
    gone = None
    for name, value in (("is_delete_marker", "true"), ("is_latest", "false")):
        if name in t.column_names:
            hit = pc.equal(pc.utf8_lower(pc.cast(t.column(name), pa.string())), value)
            gone = hit if gone is None else pc.or_(gone, hit)
    return gone


def to_manifest(batch: pa.RecordBatch, source: ListSource | None = None) -> pa.Table:
    """Manifest rows (uri, label, split, size, mtime_ns) of a batch of list rows. A missing label or split is read
    from the URI's folders as for a listed folder (`Training/<Class>/<file>`, `<Class>/<file>`); rows without a
    URI, delete markers and older versions are left out."""
    source = source or ListSource(())
    t = pa.Table.from_batches([batch])
    gone = _deleted(t)
    if gone is not None:
        t = t.filter(pc.invert(pc.fill_null(gone, False)))
    names = t.column_names
    if "uri" in names:
        uri = t.column("uri").cast(pa.string())
        if source.base is not None:
            uri = _absolute(uri, source.base)
    else:  # S3 Inventory: bucket and key (URL-encoded in CSV inventories: decoded here)
        key = t.column("key").cast(pa.string())
        if source.url_encoded_keys:  # form-encoded as AWS writes them: a space is "+", a literal "+" is "%2B"
            key = pa.chunked_array([pa.array([None if k is None else unquote_plus(k) for k in key.to_pylist()],
                                             pa.string())])
        uri = pc.binary_join_element_wise("s3://", t.column("bucket").cast(pa.string()), "/", key, "")
    parsed = pc.extract_regex(pc.fill_null(uri, ""), _LAYOUT)
    from_path_label = pc.struct_field(parsed, "label")
    folder = pc.utf8_lower(pc.struct_field(parsed, "split"))
    from_path_split = pc.if_else(pc.is_in(folder, pa.array(list(SPLITS))),
                                 pc.if_else(pc.equal(folder, "test"), "Test", "Training"),
                                 pa.scalar(None, pa.string()))

    def given(name: str, fallback: Any, typ: pa.DataType) -> Any:
        if name not in names:
            return fallback if fallback is not None else pa.nulls(len(t), typ)
        col = t.column(name).cast(typ)
        return pc.coalesce(col, fallback) if fallback is not None else col

    split = given("split", from_path_split, pa.string())
    lowered = pc.utf8_lower(split)
    split = pc.if_else(pc.equal(lowered, "training"), "Training", pc.if_else(pc.equal(lowered, "test"), "Test",
                                                                             split))
    mtime = given("mtime_ns", None, pa.int64())
    if "mtime_ns" not in names and "last_modified_date" in names:  # S3 Inventory
        mtime = pc.cast(pc.cast(t.column("last_modified_date"), pa.timestamp("ns", "UTC")), pa.int64())
    out = pa.table({"uri": uri, "label": given("label", from_path_label, pa.string()), "split": split,
                    "size": given("size", None, pa.int64()), "mtime_ns": mtime})
    keep = pc.and_(pc.is_valid(out.column("uri")), pc.not_equal(pc.fill_null(out.column("uri"), ""), ""))
    out = out.filter(keep)
    return out.set_column(1, "label", pc.fill_null(out.column("label"), ""))


def read_list(spark: Any, uri: str) -> Any:
    """The list as a DataFrame of manifest rows, read by the executors (one file per task), one row per URI."""
    source = list_files(uri)
    check(source)

    def read(_pos: int, file_uri: str) -> Iterator[pa.Table]:
        try:
            for batch in _batches(file_uri, source):
                yield to_manifest(batch, source)
        except (OSError, pa.ArrowInvalid) as exc:  # e.g. a malformed CSV row far into the file
            raise OutputError(f"--input-list {file_uri} cannot be read ({str(exc).splitlines()[0][:160]}): fix "
                              f"or remove that file") from None

    return files_frame(spark, list(source.files), read, MANIFEST_SCHEMA)


@dataclass
class Inputs:
    """A run's inputs: a listed folder (the listing is on the driver) or an input list (read by the executors)."""

    listing: Listing | None = None
    list_uri: str | None = None

    @property
    def name_rejects(self) -> pa.Table:
        """Inputs the listing itself rejects (file names that are not UTF-8)."""
        return self.listing.rejected if self.listing is not None else REJECTS_SCHEMA.empty_table()

    def ignored(self) -> dict[str, Any]:
        """run.json's counts of what the listing left out."""
        if self.listing is None:
            return {"ignored_outside_class_folders": 0, "ignored": {}}
        return {"ignored_outside_class_folders": len(self.listing.ignored),
                "ignored": self.listing.skipped_by_reason()}

    def frame(self, spark: Any, where: str | None) -> tuple[Any, int]:
        """(the manifest as a DataFrame, one row per URI, a list's staged under `where`; the number of listed
        inputs, the listing's own rejects included)."""
        if self.listing is not None:  # already in the driver's memory: handed to the JVM once, as Arrow
            return from_arrow(spark, self.listing.manifest.select(MANIFEST_SCHEMA.names)), self.listing.count
        assert self.list_uri is not None
        with output_errors():
            raw, rows = stage(read_list(spark, self.list_uri), where and storage.join(where, "_manifest"),
                              MANIFEST_SCHEMA)
            manifest = raw.dropDuplicates(["uri"])
            unique = int(manifest.count())
        if unique < rows:
            log.warning("--input-list %s names %d URI(s) more than once: each is processed once (%d rows, %d "
                        "inputs)", self.list_uri, rows - unique, rows, unique)
        log.info("input list %s: %d input(s)", self.list_uri, unique)
        return manifest, unique

    def sample(self, spark: Any, n: int) -> pa.Table:
        """Up to about `n` manifest rows spread over the input (int8 calibration), read without staging."""
        if self.listing is not None:
            return self.listing.manifest
        df = read_list(spark, self.list_uri or "")
        total = int(df.count())
        picked = df if total <= n else df.sample(fraction=min(1.0, 2.0 * n / total), seed=0)
        return to_arrow(picked).sort_by("uri")
