"""Input lists (--input-list): a Parquet or CSV file, or a folder of them (S3 Inventory), of image URIs with
optional label, split, size and modification time, read by the executors; the driver reads only the schema."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from fruitpipe import storage
from fruitpipe.errors import ConfigError, OutputError
from fruitpipe.pipeline.listing import SPLITS, Listing
from fruitpipe.schemas import MANIFEST_SCHEMA, REJECTS_SCHEMA
from fruitpipe.storage import StorageOptions

log = logging.getLogger(__name__)

FORMATS = (".parquet", ".csv", ".csv.gz")
_HOW = ("a Parquet or CSV file (or a folder of them) with a `uri` column (or S3 Inventory's `bucket` and `key`), "
        "and optionally label, split, size, mtime_ns")
#: `<split>/<label>/<file>` or `<label>/<file>` at the end of a URI, when the list gives no label or split.
_LAYOUT = r"(?:^|/)(?:(?P<split>[^/]+)/)?(?P<label>[^/]+)/[^/]+$"
_BATCH = 65_536


def list_files(uri: str, opts: StorageOptions) -> list[str]:
    """The list's files: `uri` itself, or the Parquet/CSV files below a folder; ConfigError saying what to pass."""
    uri = storage.normalize(uri)
    if storage.is_dir(uri, opts):
        files = sorted(u for u, _ in storage.list_files(uri, opts) if u.lower().endswith(FORMATS))
        if not files:
            raise ConfigError(f"--input-list {uri} is a folder without .parquet or .csv files: pass {_HOW}")
        return files
    if not storage.exists(uri, opts):
        raise ConfigError(f"--input-list {uri} does not exist: pass {_HOW}")
    if not uri.lower().endswith(FORMATS):
        raise ConfigError(f"--input-list {uri} is neither .parquet nor .csv: pass {_HOW}")
    return [uri]


def _batches(uri: str, opts: StorageOptions) -> Iterator[pa.RecordBatch]:
    """The file's rows, a batch at a time (memory flat in the file's size)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fs, path = storage.resolve(uri, opts)
    if uri.lower().endswith(".parquet"):
        with fs.open_input_file(path) as fh:
            yield from pq.ParquetFile(fh).iter_batches(batch_size=_BATCH)
        return
    compression = "gzip" if uri.lower().endswith(".gz") else None
    with fs.open_input_stream(path, compression=compression) as fh:
        # Every column as text: a class named "1" stays a label, and sizes are parsed below.
        reader = pacsv.open_csv(fh, convert_options=pacsv.ConvertOptions(strings_can_be_null=True,
                                                                          column_types=_CSV_TYPES),
                                read_options=pacsv.ReadOptions(block_size=8 << 20))
        yield from reader


_CSV_TYPES = {"uri": pa.string(), "bucket": pa.string(), "key": pa.string(), "label": pa.string(),
              "split": pa.string(), "size": pa.int64(), "mtime_ns": pa.int64()}


def columns_of(uri: str, opts: StorageOptions) -> list[str]:
    """Column names of one list file (a Parquet footer, a CSV header)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fs, path = storage.resolve(uri, opts)
    try:
        if uri.lower().endswith(".parquet"):
            with fs.open_input_file(path) as fh:
                return list(pq.ParquetFile(fh).schema_arrow.names)
        compression = "gzip" if uri.lower().endswith(".gz") else None
        with fs.open_input_stream(path, compression=compression) as fh:
            return list(pacsv.open_csv(fh).schema.names)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ConfigError(f"--input-list {uri} cannot be read ({str(exc)[:120]}): pass {_HOW}") from None


def check(files: list[str], opts: StorageOptions) -> None:
    """ConfigError unless each file names its images (a `uri` column, or `bucket` and `key`)."""
    for uri in files:
        names = set(columns_of(uri, opts))
        if "uri" not in names and not {"bucket", "key"} <= names:
            raise ConfigError(f"--input-list {uri} has no `uri` column (columns: {', '.join(sorted(names)) or 'none'})"
                              f": pass {_HOW}")


def to_manifest(batch: pa.RecordBatch) -> pa.Table:
    """Manifest rows (uri, label, split, size, mtime_ns) of a batch of list rows. A missing label or split is read
    from the URI's folders as for a listed folder (`Training/<Class>/<file>`, `<Class>/<file>`); rows without a
    URI are left out."""
    t = pa.Table.from_batches([batch])
    names = t.column_names
    if "uri" in names:
        uri = t.column("uri").cast(pa.string())
    else:  # S3 Inventory: bucket and key (URL-encoded in CSV inventories: decode before listing)
        uri = pc.binary_join_element_wise("s3://", t.column("bucket").cast(pa.string()), "/",
                                          t.column("key").cast(pa.string()), "")
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


def read_list(spark: Any, uri: str, opts: StorageOptions) -> Any:
    """The list as a DataFrame of manifest rows, read by the executors (one file per task), one row per URI."""
    from fruitpipe.pipeline.frames import files_frame

    files = list_files(uri, opts)
    check(files, opts)

    def read(_pos: int, file_uri: str) -> Iterator[pa.Table]:
        try:
            for batch in _batches(file_uri, opts):
                yield to_manifest(batch)
        except (OSError, pa.ArrowInvalid) as exc:  # e.g. a malformed CSV row far into the file
            raise OutputError(f"--input-list {file_uri} cannot be read ({str(exc).splitlines()[0][:160]}): fix "
                              f"or remove that file") from None

    return files_frame(spark, files, read, MANIFEST_SCHEMA)


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

    def frame(self, spark: Any, where: str | None, opts: StorageOptions) -> tuple[Any, int]:
        """(the manifest as a DataFrame, one row per URI, a list's staged under `where`; the number of listed
        inputs, the listing's own rejects included)."""
        from fruitpipe.pipeline.frames import output_errors, stage
        from fruitpipe.spark import from_arrow

        if self.listing is not None:  # already in the driver's memory: handed to the JVM once, as Arrow
            return from_arrow(spark, self.listing.manifest.select(MANIFEST_SCHEMA.names)), self.listing.count
        assert self.list_uri is not None
        with output_errors():
            raw, rows = stage(read_list(spark, self.list_uri, opts), where and storage.join(where, "_manifest"),
                              MANIFEST_SCHEMA, opts)
            manifest = raw.dropDuplicates(["uri"])
            unique = int(manifest.count())
        if unique < rows:
            log.warning("--input-list %s names %d URI(s) more than once: each is processed once (%d rows, %d "
                        "inputs)", self.list_uri, rows - unique, rows, unique)
        log.info("input list %s: %d input(s)", self.list_uri, unique)
        return manifest, unique

    def sample(self, spark: Any, opts: StorageOptions, n: int) -> pa.Table:
        """Up to about `n` manifest rows spread over the input (int8 calibration), read without staging."""
        if self.listing is not None:
            return self.listing.manifest
        from fruitpipe.spark import to_arrow

        df = read_list(spark, self.list_uri or "", opts)
        total = int(df.count())
        picked = df if total <= n else df.sample(fraction=min(1.0, 2.0 * n / total), seed=0)
        return to_arrow(picked).sort_by("uri")
