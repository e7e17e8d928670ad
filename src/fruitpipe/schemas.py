"""Every Arrow/Spark schema of fruitpipe in one place; the source row (uri, label, split, size, mtime) is declared
once and shared by the manifest, embeddings, rejects and reduced vectors."""

from __future__ import annotations

import pyarrow as pa

#: Where a row comes from: the input's URI, its class folder and split folder.
SOURCE_FIELDS = [
    pa.field("uri", pa.string(), nullable=False),
    pa.field("label", pa.string(), nullable=False),
    pa.field("split", pa.string()),
]

#: The input file as it was when processed: a row stays valid while (uri, size, mtime_ns) are unchanged.
STAT_FIELDS = [
    pa.field("size", pa.int64()),
    pa.field("mtime_ns", pa.int64()),
]

#: One listed input.
MANIFEST_SCHEMA = pa.schema([*SOURCE_FIELDS, *STAT_FIELDS])

ID_FIELD = pa.field("id", pa.string())  # sha256 of the input's bytes

#: embeddings/: one row per embedded image. Features are a plain list<float32> (length = the model's dim):
#: Spark and pandas read plain lists, not fixed-size ones.
EMBEDDINGS_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False), *SOURCE_FIELDS,
    pa.field("features", pa.list_(pa.float32()), nullable=False), *STAT_FIELDS,
])

#: rejects/: one row per input that could not be embedded; id is null when the bytes could not be read.
REJECTS_SCHEMA = pa.schema([
    ID_FIELD, *SOURCE_FIELDS,
    pa.field("reason", pa.string(), nullable=False),
    pa.field("detail", pa.string(), nullable=False),
    *STAT_FIELDS,
])

#: reduced/: one row per embedded image, its PCA projection.
REDUCED_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False), *SOURCE_FIELDS,
    pa.field("pca", pa.list_(pa.float32()), nullable=False),
])

#: The per-input index each embed task stages (never the features): what the run's duplicate check reads.
INDEX_SCHEMA = pa.schema([
    ("uri", pa.string()), ("id", pa.string()), ("label", pa.string()), ("split", pa.string()),
    ("status", pa.string()), ("reason", pa.string()), ("part", pa.string()),
])

#: What each embed task returns to the driver: one row of counts, whatever the number of inputs.
TASK_SUMMARY_SCHEMA = pa.schema([
    ("part", pa.string()), ("embedded", pa.int64()), ("rejected", pa.int64()), ("bytes_read", pa.int64()),
    ("pid", pa.int64()), ("sessions_built", pa.int32()), ("threads", pa.int32()),
])
TASK_SUMMARY_DDL = ("part string, embedded long, rejected long, bytes_read long, pid long, sessions_built int, "
                    "threads int")

#: The embed job's input rows (Spark DDL of the manifest columns a task needs).
TASK_INPUT_COLUMNS = ["uri", "label", "split", "size", "mtime_ns"]


def embeddings_schema(dim: int) -> pa.Schema:
    """Schema of embeddings/ for a model of `dim` features (the list length is not part of the Arrow type)."""
    del dim
    return EMBEDDINGS_SCHEMA


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with `schema`'s columns in order; columns an older output lacks (size, mtime_ns) are null."""
    cols = []
    for f in schema:
        if f.name in table.column_names:
            cols.append(table.column(f.name).cast(f.type))
        else:
            cols.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=schema)
