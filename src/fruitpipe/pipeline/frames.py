"""Row sets too large for the driver, as Spark DataFrames read and written by the executors through pyarrow.fs:
committed part files, the run's manifest and index staged as Parquet, and a driver-side error for a bad file."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from fruitpipe import schemas, storage
from fruitpipe.errors import OutputError
from fruitpipe.output import corrupt_part, index_columns, read_part_index
from fruitpipe.spark import default_parallelism, from_arrow

log = logging.getLogger(__name__)

#: Prefix of the message a task raises for a file it cannot read; the driver turns it back into an OutputError.
_MARK = "FRUITPIPE-OUTPUT-ERROR:"

#: Parquet files a task reads at most when reading a dataset (files are grouped so 20,000 parts are not 20,000 tasks).
FILES_PER_TASK = 64


def ddl(schema: pa.Schema) -> str:
    """The Spark DDL of an Arrow schema made of strings, int32 and int64 columns."""
    names = {pa.string(): "string", pa.int64(): "long", pa.int32(): "int", pa.bool_(): "boolean"}
    return ", ".join(f"{f.name} {names[f.type]}" for f in schema)


@contextlib.contextmanager
def output_errors() -> Iterator[None]:
    """Turn a task's failure on an unreadable or corrupt file back into the OutputError it raised."""
    try:
        yield
    except Exception as exc:
        text = str(exc)
        if _MARK in text:
            message = text.split(_MARK, 1)[1].splitlines()[0].strip()
            raise OutputError(message) from None
        raise


def file_tasks(spark: Any, files: int) -> int:
    """Tasks that read `files` part files: one per core at least, at most FILES_PER_TASK files each."""
    return max(1, min(files, max(default_parallelism(spark), math.ceil(files / FILES_PER_TASK))))


def output_error_text(exc: BaseException) -> str | None:
    """The message of an OutputError a task hit (raised as such, or as task_error's RuntimeError); None for others."""
    if isinstance(exc, OutputError):
        return str(exc)
    text = str(exc)
    return text.split(_MARK, 1)[1].splitlines()[0].strip() if _MARK in text else None


def task_error(exc: OutputError) -> RuntimeError:
    """What a task raises for an OutputError; output_errors() on the driver turns it back into the same error."""
    return RuntimeError(f"{_MARK} {exc}")


def part_batches(uri: str, columns: list[str], batch_size: int = 2048
                 ) -> Iterator[pa.RecordBatch]:
    """The given columns of one committed part file, a batch at a time, inside a task: a worker holds one batch,
    whatever the size of the part; an unreadable or corrupt part is the marked error output_errors() expects."""
    fs, path = storage.resolve(uri)
    try:
        with fs.open_input_file(path) as fh:
            yield from pq.ParquetFile(fh).iter_batches(batch_size=batch_size, columns=columns)
    except (OSError, pa.ArrowInvalid) as exc:
        raise task_error(corrupt_part(uri, exc)) from None


def empty_frame(spark: Any, schema: pa.Schema) -> Any:
    """A DataFrame with no rows, made in the JVM from Arrow: createDataFrame([]) parallelizes a Python list, and
    the Python RDD workers that takes were a second pool, forked (1.3 s) for nothing."""
    return from_arrow(spark, schema.empty_table())


def over_files(spark: Any, files: list[str], tasks: int,
               fn: Callable[[Iterator[tuple[int, str]]], Iterator[pa.RecordBatch]], out_ddl: str) -> Any:
    """mapInArrow over a list of files: each of `tasks` tasks calls `fn` with its (position, uri) pairs, in order.
    The tasks are a JVM range indexing the list (shipped with the function), not a parallelized Python list: that
    one needed Python RDD workers, a second pool next to the SQL one, and forking it cost 1.3 s per run. The tasks
    run in the driver's storage context (storage.configured), shipped with the function."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        yield from fn((pos, files[pos]) for batch in batches for pos in batch.column(0).to_pylist())

    return spark.range(0, len(files), 1, max(1, tasks)).mapInArrow(storage.carried(run), out_ddl)


def files_frame(spark: Any, files: list[str], read: Callable[[int, str], Iterable[pa.Table]],
                schema: pa.Schema) -> Any:
    """A DataFrame of `schema` made by `read(position, uri)` (the file's rows, a table at a time) on the executors,
    files grouped into tasks; the driver holds only the list of files."""
    if not files:
        return empty_frame(spark, schema)

    def read_files(items: Iterator[tuple[int, str]]) -> Iterator[pa.RecordBatch]:
        for pos, uri in items:
            try:
                for table in read(pos, uri):
                    yield from schemas.conform(table, schema).to_batches(max_chunksize=65_536)
            except OutputError as exc:
                raise task_error(exc) from None

    return over_files(spark, files, file_tasks(spark, len(files)), read_files, ddl(schema))


def index_frame(spark: Any, files: list[str], columns: list[str], dataset_schema: pa.Schema) -> Any:
    """The given columns of a committed dataset's part files, plus _file (part name), _fileno (its place in the
    commit record) and _row (row in that part), read on the executors (output.read_part_index)."""
    schema = index_columns(columns, dataset_schema).insert(len(columns) + 1, pa.field("_fileno", pa.int32()))

    def read(pos: int, uri: str) -> list[pa.Table]:
        t = read_part_index(uri, columns, dataset_schema)
        return [t.add_column(len(columns) + 1, "_fileno", pa.repeat(pa.scalar(pos, pa.int32()), t.num_rows))]

    return files_frame(spark, files, read, schema)


def stage(df: Any, where: str | None, schema: pa.Schema) -> tuple[Any, int]:
    """Materialise `df` once: (a DataFrame that reads it back, its row count). With `where`, each task writes its
    rows to a Parquet file there and later jobs read those files (a lost executor cannot lose them); without it
    (a dry run, which writes nothing) Spark keeps them on the executors' local disks."""
    if where is None:
        from pyspark.storagelevel import StorageLevel

        kept = df.persist(StorageLevel.DISK_ONLY)
        return kept, int(kept.count())

    def write(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        assert ctx is not None, "runs inside a Spark task"
        got = [b for b in batches if b.num_rows]
        if got:
            table = schemas.conform(pa.Table.from_batches(got), schema)
            storage.write_parquet(table, storage.join(where, f"part-{ctx.partitionId():05d}.parquet"))
        yield pa.RecordBatch.from_pydict({"rows": [sum(b.num_rows for b in got)]}, schema=pa.schema([("rows",
                                                                                                     pa.int64())]))

    rows = int(sum(r["rows"] for r in df.mapInArrow(storage.carried(write), "rows long").collect()))
    files = storage.parquet_files(where) if rows else []
    return files_frame(df.sparkSession, files, lambda _pos, uri: [storage.read_parquet(uri)], schema), rows
