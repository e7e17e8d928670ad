"""Sums computed on the executors and combined on the driver (the PCA's Gramian, the classifier's statistics, the
scoring passes), shipped in bounded chunks and checked whole: a sum that misses a task is an error, never a
smaller number."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from fruitpipe.errors import OutputError
from fruitpipe.pipeline.frames import file_tasks, output_error_text, output_errors, over_files
from fruitpipe.spark import to_arrow

#: Up to this many tasks' sums are collected and added by the driver; beyond it Spark combines them in a tree
#: (treeReduce), so the driver receives a few whatever the number of tasks.
FEW_PARTIALS = 4
#: float64 values per shipped row (4 MiB). One task's classifier statistics are ~46 MB at 98 classes: shipped as
#: one value, the driver JVM pickled it into a doubling buffer and ran out of its 1 GiB heap in CI, and the Python
#: side then received the other tasks' rows without an error (a sum silently missing half the photos).
CHUNK = 1 << 19

#: The chunk number of a row that carries a task's OutputError (its message) instead of its sum.
ERROR_CHUNK = -1

_SCHEMA = pa.schema([("task", pa.int32()), ("chunk", pa.int32()), ("data", pa.binary())])


def _chunks(task: int, total: np.ndarray) -> Iterator[pa.RecordBatch]:
    for i, start in enumerate(range(0, max(len(total), 1), CHUNK)):
        yield pa.RecordBatch.from_pydict(
            {"task": [task], "chunk": [i], "data": [total[start:start + CHUNK].tobytes()]}, schema=_SCHEMA)


def _whole(parts: dict[int, bytes], size: int, what: str) -> np.ndarray:
    """One task's vector from its chunks, refusing a missing or extra one."""
    expected = max(1, -(-size // CHUNK))
    if sorted(parts) != list(range(expected)):
        raise OutputError(f"{what}: {len(parts)} of {expected} chunk(s) arrived; run the command again")
    out = np.frombuffer(b"".join(parts[i] for i in range(expected)), dtype=np.float64)
    if len(out) != size:
        raise OutputError(f"{what}: {len(out)} of {size} values arrived; run the command again")
    return out


def assemble(rows: list[tuple[int, int, bytes]], tasks: int, size: int) -> np.ndarray:
    """The sum of `tasks` tasks' vectors of `size` from their (task, chunk, bytes) rows: every task and every chunk
    exactly once, or an OutputError (a lost result must never pass for a smaller sum)."""
    by_task: dict[int, dict[int, bytes]] = {}
    for task, chunk, data in rows:
        if chunk in by_task.setdefault(task, {}):
            raise OutputError(f"the sum received chunk {chunk} of task {task} twice; run the command again")
        by_task[task][chunk] = data
    if sorted(by_task) != list(range(tasks)):
        raise OutputError(f"the sum received the results of {len(by_task)} of {tasks} task(s); run the command again")
    total = np.zeros(size)
    for task in range(tasks):
        total += _whole(by_task[task], size, f"task {task}")
    return total


def sum_per_task(spark: Any, files: list[str], size: int, task: Any) -> np.ndarray:
    """The sum over tasks of task(items) (a float64 vector of `size` per task, from its (position, uri) pairs),
    for sums a task accumulates in place rather than one vector per part (classify.stats). Each task ships its
    vector in CHUNK-value rows; with few tasks the driver collects them through Arrow (whose collection reports a
    failed JVM side instead of ending early) and checks every (task, chunk) arrived once; with more, Spark adds
    them in a tree after each partition has put its task's vector back together, and the tree's task count (one
    value appended to each vector) must equal the number of tasks."""
    tasks = file_tasks(spark, len(files))

    def run(items: Iterator[tuple[int, str]]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        context = TaskContext.get()
        assert context is not None  # always set inside a task
        try:
            total = np.asarray(task(items), dtype=np.float64)
        except Exception as exc:
            message = output_error_text(exc)
            if message is None:
                raise
            # A bad part file is an answer, not a failed job: failing it killed the other tasks, whose Python
            # workers then printed a BrokenPipeError after the CLI's one-line error (seen in the tests, not always).
            yield pa.RecordBatch.from_pydict({"task": [context.partitionId()], "chunk": [ERROR_CHUNK],
                                              "data": [message.encode()]}, schema=_SCHEMA)
            return
        yield from _chunks(context.partitionId(), np.concatenate([total, [1.0]]))

    partials = over_files(spark, files, tasks, run, "task int, chunk int, data binary")
    with output_errors():
        if tasks <= FEW_PARTIALS:
            table = to_arrow(partials)
            rows = list(zip(table.column("task").to_pylist(), table.column("chunk").to_pylist(),
                            table.column("data").to_pylist(), strict=True))
            _raise_first([(t, d.decode()) for t, c, d in rows if c == ERROR_CHUNK])
            total = assemble(rows, tasks, size + 1)
        else:
            total, errors = partials.rdd.mapPartitions(lambda it: _per_partition(it, size + 1)).treeReduce(
                _combine, depth=2)
            _raise_first(errors)
    if round(total[-1]) != tasks:
        raise OutputError(f"the sum holds the results of {round(total[-1])} of {tasks} task(s); run the command again")
    return total[:-1]


def _raise_first(errors: list[tuple[int, str]]) -> None:
    if errors:
        raise OutputError(min(errors)[1])  # the first task's: the same message whatever the order of arrival


def _per_partition(rows: Iterator[Any], size: int) -> Iterator[tuple[np.ndarray | None, list[tuple[int, str]]]]:
    """(vector, errors) of each task whose rows a partition holds, its vector put back together whole."""
    by_task: dict[int, dict[int, bytes]] = {}
    errors = []
    for row in rows:
        if row[1] == ERROR_CHUNK:
            errors.append((row[0], bytes(row[2]).decode()))
        else:
            by_task.setdefault(row[0], {})[row[1]] = bytes(row[2])
    for task, parts in by_task.items():
        yield _whole(parts, size, f"task {task}").copy(), []
    if errors:
        yield None, errors


def _combine(a: tuple[np.ndarray | None, list[tuple[int, str]]], b: tuple[np.ndarray | None, list[tuple[int, str]]]
             ) -> tuple[np.ndarray | None, list[tuple[int, str]]]:
    errors = a[1] + b[1]
    if errors or a[0] is None or b[0] is None:
        return None, errors
    return a[0] + b[0], []


def sum_over_parts(spark: Any, files: list[str], size: int, fn: Any) -> np.ndarray:
    """The sum of fn(position, uri) (float64 vectors of `size`) over the part files, on the executors: each task
    reads its files one after the other and keeps one running sum (its memory is one batch and one sum, whatever
    the number of parts). Files are grouped (frames.file_tasks): one Gramian per file made the combining cost more
    than the sums. The tasks are SQL ones (over_files), whose Python workers the run already has; the tree runs
    in Python RDD workers, which only a large input pays for."""

    def task(items: Iterator[tuple[int, str]]) -> np.ndarray:
        total = np.zeros(size)
        for pos, uri in items:
            total += fn(pos, uri)
        return total

    return sum_per_task(spark, files, size, task)
