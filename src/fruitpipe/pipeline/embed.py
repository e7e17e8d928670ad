"""Embed stage: on the executors, bytes -> RGB 224x224 -> ONNX features; part files staged, then deduplicated."""

from __future__ import annotations

import itertools
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fruitpipe import images, storage
from fruitpipe.config import task_count
from fruitpipe.models import runner
from fruitpipe.pipeline.frames import files_frame
from fruitpipe.schemas import (
    INDEX_SCHEMA,
    REJECTS_SCHEMA,
    TASK_INPUT_COLUMNS,
    TASK_SUMMARY_DDL,
    TASK_SUMMARY_SCHEMA,
    embeddings_schema,
)
from fruitpipe.spark import ArrowFn, JobProgress, default_parallelism, to_arrow
from fruitpipe.storage import StorageOptions
from fruitpipe.vectors import to_list_array

log = logging.getLogger(__name__)

#: Spark job group of the embed job (progress bar, run.json's peak memory of the stage).
JOB_GROUP = "fruitpipe-embed"
#: Where each task stages the index of its inputs (uri, id, status...), under the run's staging prefix.
INDEX_DIR = "_index"


@dataclass(frozen=True)
class EmbedSettings:
    """Everything a task needs besides the broadcast model bytes; small and picklable."""

    model_sha256: str
    input_size: int
    input_name: str
    output_name: str
    dim: int
    batch_size: int
    max_pixels: int
    staging_uri: str
    storage: StorageOptions
    device: str = "cpu"
    read_ahead: int = 8
    preprocess: str = "tf"
    layout: str = "nhwc"
    #: The broadcast model takes uint8 NHWC pixels (models/wrap.py): tasks hand it the decoded bytes as they are.
    uint8_input: bool = False


def read_input(uri: str) -> bytes:
    """Read one input; a missing or forbidden object is a Rejected('unreadable'), other I/O errors propagate.

    Propagating (instead of rejecting) errors such as a lost connection makes the task fail and Spark retry it,
    so an outage never turns good images into rejects.
    """
    try:
        return storage.read_object(uri)
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        raise images.Rejected("unreadable", f"{type(exc).__name__}: {exc}") from None
    except OSError as exc:
        # A local read error belongs to that file; on S3 only a refusal or absence (above) is the object's fault.
        if not storage.is_s3(uri):
            raise images.Rejected("unreadable", f"{type(exc).__name__}: {exc}") from None
        raise


def _fetch(uri: str) -> bytes | images.Rejected:
    try:
        return read_input(uri)
    except images.Rejected as rj:
        return rj


def read_ahead(uris: Iterable[str], window: int) -> Iterator[bytes | images.Rejected]:
    """The bytes of each uri, in order, with up to `window` reads in flight: an S3 GET of a small object takes
    20-50 ms, which one read at a time would make the bottleneck. Memory stays bounded by the window."""
    if window <= 1:
        yield from (_fetch(uri) for uri in uris)
        return
    it = iter(uris)
    with ThreadPoolExecutor(max_workers=window, thread_name_prefix="fruitpipe-read") as pool:
        pending = deque(pool.submit(_fetch, uri) for uri in itertools.islice(it, window))
        while pending:
            result = pending.popleft().result()  # infrastructure errors propagate: the task fails and retries
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(_fetch, nxt))
            yield result


Prepared = tuple[str | None, "np.ndarray | images.Rejected"]


def _prepare(data: bytes | images.Rejected, settings: EmbedSettings) -> Prepared:
    """(content id, model input) of one input's bytes, or (id if known, the reason it is rejected)."""
    if isinstance(data, images.Rejected):
        return None, data
    cid = images.content_id(data)
    try:
        if settings.uint8_input:
            return cid, images.model_pixels(data, settings.input_size, settings.max_pixels)
        return cid, images.model_input(data, settings.input_size, settings.max_pixels, settings.preprocess,
                                       settings.layout)
    except images.Rejected as rj:
        return cid, rj
    except Exception as exc:  # never let one hostile file fail the task (and every retry of it)
        return cid, images.Rejected("corrupt", f"{type(exc).__name__}: {exc}"[:300])


def prepared(uris: list[str], settings: EmbedSettings) -> Iterator[Prepared]:
    """_prepare of each uri's bytes, in order."""
    return (_prepare(data, settings) for data in read_ahead(uris, settings.read_ahead))


def embed_rows(
    rows: pa.Table,
    predict: Callable[[np.ndarray], np.ndarray],
    settings: EmbedSettings,
    overlap: bool = False,
) -> tuple[pa.Table, pa.Table]:
    """Embed manifest rows (uri, label, split): returns (embeddings, rejects) tables; every row ends in one.

    With `overlap`, each batch is inferred in a background thread while the next one is decoded (onnxruntime
    releases the GIL), so a GPU and the decoding core work at the same time; order and results are unchanged.
    """
    emb: dict[str, list] = {"id": [], "uri": [], "label": [], "split": [], "features": [], "size": [],
                            "mtime_ns": []}
    rej: dict[str, list] = {"id": [], "uri": [], "label": [], "split": [], "reason": [], "detail": [], "size": [],
                            "mtime_ns": []}
    pending: list[tuple[str, str, str, str | None, int | None, int | None, np.ndarray]] = []
    in_flight: list[tuple[Future, list]] = []  # submitted, not yet collected: at most 2 batches
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fruitpipe-infer") if overlap else None

    def append(feats: np.ndarray, meta: list) -> None:
        finite = np.isfinite(feats).all(axis=1) if len(feats) else np.zeros(0, bool)
        for (cid, uri, label, split, size, mtime), vec, ok in zip(meta, feats, finite):
            if not ok:  # never published: NaN rows would poison the PCA, train and drift of the whole output
                bad = int((~np.isfinite(vec)).sum())
                detail = f"{bad} of {len(vec)} features are NaN or infinite"
                for key, value in zip(rej, (cid, uri, label, split, "not_finite", detail, size, mtime)):
                    rej[key].append(value)
                continue
            for key, value in (("id", cid), ("uri", uri), ("label", label), ("split", split), ("features", vec),
                               ("size", size), ("mtime_ns", mtime)):
                emb[key].append(value)

    def collect_oldest() -> None:
        done, meta = in_flight.pop(0)
        append(done.result(), meta)

    def flush() -> None:
        if not pending:
            return
        batch, meta = np.stack([p[6] for p in pending]), [p[:6] for p in pending]
        pending.clear()
        if pool is None:
            append(predict(batch), meta)
            return
        in_flight.append((pool.submit(predict, batch), meta))
        if len(in_flight) > 1:
            collect_oldest()

    try:
        uris, labels, splits = (rows.column(c).to_pylist() for c in ("uri", "label", "split"))
        n = rows.num_rows
        sizes, mtimes = ((rows.column(c).to_pylist() if c in rows.column_names else [None] * n)
                         for c in ("size", "mtime_ns"))
        for uri, label, split, size, mtime, (cid, x) in zip(uris, labels, splits, sizes, mtimes,
                                                            prepared(uris, settings)):
            if isinstance(x, images.Rejected):
                for key, value in zip(rej, (cid, uri, label, split, x.reason, x.detail, size, mtime)):
                    rej[key].append(value)
                continue
            pending.append((cid, uri, label, split, size, mtime, x))
            if len(pending) >= settings.batch_size:
                flush()
        flush()
        while in_flight:
            collect_oldest()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    feats = emb.pop("features")
    features = to_list_array(np.stack(feats) if feats else np.zeros((0, settings.dim), np.float32))
    emb_table = pa.table({**emb, "features": features}, schema=embeddings_schema(settings.dim))
    return emb_table, pa.table(rej, schema=REJECTS_SCHEMA)


def _index_table(emb: pa.Table, rej: pa.Table, part: str) -> pa.Table:
    """One row per input of a task (no features): what the run's duplicate check reads."""
    n_emb, n_rej = emb.num_rows, rej.num_rows
    return pa.table(
        {
            "uri": pa.concat_arrays([emb.column("uri").combine_chunks(), rej.column("uri").combine_chunks()]),
            "id": pa.concat_arrays([emb.column("id").combine_chunks(), rej.column("id").combine_chunks()]),
            "label": pa.concat_arrays([emb.column("label").combine_chunks(), rej.column("label").combine_chunks()]),
            "split": pa.concat_arrays([emb.column("split").combine_chunks(), rej.column("split").combine_chunks()]),
            "status": pa.array(["embedded"] * n_emb + ["rejected"] * n_rej, pa.string()),
            "reason": pa.concat_arrays([pa.nulls(n_emb, pa.string()), rej.column("reason").combine_chunks()]),
            "part": pa.array([part] * (n_emb + n_rej), pa.string()),
        },
        schema=INDEX_SCHEMA,
    )


def _summary(emb: pa.Table, rej: pa.Table, part: str, threads: int, model_sha256: str) -> pa.RecordBatch:
    """What a task returns to the driver: one row of counts, whatever the number of inputs."""
    read = pc.invert(pc.equal(rej.column("reason"), "unreadable"))
    bytes_read = (pc.sum(emb.column("size")).as_py() or 0) + (pc.sum(pc.filter(rej.column("size"), read)).as_py()
                                                             or 0)
    return pa.RecordBatch.from_pydict(
        {"part": [part], "embedded": [emb.num_rows], "rejected": [rej.num_rows], "bytes_read": [int(bytes_read)],
         "pid": [os.getpid()], "sessions_built": [runner.SESSIONS_BUILT.get(model_sha256, 0)], "threads": [threads]},
        schema=TASK_SUMMARY_SCHEMA,
    )


def make_partition_fn(settings: EmbedSettings, model_bc: object) -> ArrowFn:
    """The mapInArrow function: embed one partition, write its part files and its index to staging, return one
    summary row."""

    def embed_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        storage.configure(settings.storage)  # the driver's storage context, in this worker
        ctx = TaskContext.get()
        assert ctx is not None, "runs inside a Spark task"
        part = f"part-{ctx.partitionId():05d}.parquet"
        threads = max(1, int(ctx.cpus()))  # onnxruntime threads follow spark.task.cpus
        got = [b for b in batches if b.num_rows]
        if not got:  # an empty partition (more tasks than inputs): nothing to embed or report
            return
        predict = runner.make_predict_fn(
            settings.model_sha256, lambda: model_bc.value, threads,  # type: ignore[attr-defined]
            settings.input_name, settings.output_name, settings.device,
            runner.task_gpu(ctx.resources()),  # the task's GPU under Spark GPU scheduling, on multi-GPU nodes
        )
        rows = pa.Table.from_batches(got)
        # On a GPU, decoding and inference overlap (bench/gpu.py); on a CPU both need the task's cores.
        emb, rej = embed_rows(rows, predict, settings, overlap=runner.uses_cuda(settings.device))
        if emb.num_rows:
            storage.write_parquet(emb, storage.join(settings.staging_uri, "embeddings", part))
        if rej.num_rows:
            storage.write_parquet(rej, storage.join(settings.staging_uri, "rejects", part))
        storage.write_parquet(_index_table(emb, rej, part), storage.join(settings.staging_uri, INDEX_DIR, part))
        yield _summary(emb, rej, part, threads, settings.model_sha256)

    return embed_partition


def run_embed_job(
    spark: object,
    todo: object,
    n: int,
    settings: EmbedSettings,
    model_bytes: bytes,
    partition_size: int,
    quiet: bool,
) -> pa.Table:
    """Embed the `todo` manifest rows (a DataFrame of `n` rows) on the cluster; returns one summary row per task
    (TASK_SUMMARY_SCHEMA), the per-input index being staged under INDEX_DIR."""
    sc = spark.sparkContext  # type: ignore[attr-defined]
    parts = task_count(n, partition_size, default_parallelism(spark))
    model_bc = sc.broadcast(model_bytes)  # shipped once per executor, not once per task
    try:
        # Equal round-robin partitions of the staged rows; the rows never pass through the driver.
        df = todo.select(*TASK_INPUT_COLUMNS).repartition(parts)  # type: ignore[attr-defined]
        out = df.mapInArrow(make_partition_fn(settings, model_bc), TASK_SUMMARY_DDL)
        with JobProgress(spark, JOB_GROUP, total=n, desc="embed", quiet=quiet, tasks=parts):
            summary = to_arrow(out)
    finally:
        model_bc.destroy()
    return summary


def index_frame(spark: object, settings: EmbedSettings) -> object:
    """The staged per-input index of this run's embed job, read by the executors."""
    files = storage.parquet_files(storage.join(settings.staging_uri, INDEX_DIR))
    return files_frame(spark, files, lambda _pos, uri: [storage.read_parquet(uri)], INDEX_SCHEMA)


def drop_rows_from_parts(spark: object, files: dict[str, list[str]]) -> None:
    """On the executors, rewrite each staged part file without the given uris."""

    def rewrite(item: tuple[str, list[str]]) -> None:
        uri, drop = item
        table = storage.read_parquet(uri)
        storage.write_parquet(table.filter(pc.invert(pc.is_in(table.column("uri"), pa.array(drop)))), uri)

    items = sorted(files.items())
    if items:
        spark.sparkContext.parallelize(items, len(items)).foreach(storage.carried(rewrite))  # type: ignore[attr-defined]
