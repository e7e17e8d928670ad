"""Sums on the executors: vectors larger than one shipped chunk come back exact, through the driver's collection
and through the tree; a result that lost a task or a chunk is an error, never a smaller sum."""

from __future__ import annotations

import numpy as np
import pytest

from fruitpipe.errors import OutputError
from fruitpipe.pipeline import sums

# Also run on the EMR nodes' packages (scripts/nodes-env.sh: PySpark 3.5, numpy 1.x).
pytestmark = pytest.mark.nodes


def _vector(pos: int, size: int) -> np.ndarray:
    return np.random.default_rng(pos).standard_normal(size)


@pytest.mark.parametrize("parts", [3, 11])  # 3: the driver adds them (<= FEW_PARTIALS tasks); 11: the tree
def test_a_sum_over_several_chunks_equals_numpy(spark, parts: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fruitpipe.pipeline.frames.FILES_PER_TASK", 1)
    size = 2 * sums.CHUNK + 17
    files = [f"part-{i}" for i in range(parts)]
    got = sums.sum_over_parts(spark, files, size,  # a lambda: the workers cannot import this module
                              lambda pos, _uri: np.random.default_rng(pos).standard_normal(size))
    np.testing.assert_allclose(got, sum(_vector(i, size) for i in range(parts)), rtol=1e-12, atol=1e-12)


def test_a_sum_of_a_large_vector_per_task_arrives_whole(spark) -> None:
    """The classifier statistics' size (46 MB a task at 98 classes, 3 folds): shipped as one value, it exhausted
    the driver JVM's heap in CI, and the collection returned the other task's rows as if complete."""
    size = 3 * 98 * 1281 + 7 * 1280 * 1281 // 2
    files = ["a", "b"]
    got = sums.sum_over_parts(spark, files, size, lambda pos, _uri: np.full(size, pos + 1.0))
    assert got.shape == (size,) and np.all(got == 3.0)


def _rows(tasks: int, size: int) -> list[tuple[int, int, bytes]]:
    rows = []
    for t in range(tasks):
        v = np.full(size, float(t))
        rows += [(t, i, v[s:s + sums.CHUNK].tobytes()) for i, s in enumerate(range(0, size, sums.CHUNK))]
    return rows


def test_assemble_refuses_a_lost_task_a_lost_chunk_and_a_repeated_one() -> None:
    size = 2 * sums.CHUNK + 1
    rows = _rows(3, size)
    assert np.all(sums.assemble(rows, 3, size) == 3.0)
    with pytest.raises(OutputError, match="2 of 3 task"):
        sums.assemble([r for r in rows if r[0] != 1], 3, size)
    with pytest.raises(OutputError, match="2 of 3 chunk"):
        sums.assemble([r for r in rows if (r[0], r[1]) != (2, 1)], 3, size)
    with pytest.raises(OutputError, match="twice"):
        sums.assemble(rows + rows[:1], 3, size)
    with pytest.raises(OutputError, match="2 of 3 task"):
        sums.assemble([r for r in rows if r[0] != 2], 3, size)  # the last one too


@pytest.mark.parametrize("parts", [3, 11])
def test_a_bad_part_is_the_sums_one_error_and_fails_no_task(spark, parts: int, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """A task that meets a bad part answers with its OutputError instead of failing the job (failing it killed the
    other tasks mid-start, and their workers printed after the CLI's one-line error); the driver raises the first."""
    monkeypatch.setattr("fruitpipe.pipeline.frames.FILES_PER_TASK", 1)
    # By id, not by position: the tracker keeps the last spark.ui.retainedJobs (1,000) jobs and drops a tenth of
    # them at once past that, so a session that ran many jobs before this test shortens the list.
    last_before = max(spark.sparkContext.statusTracker().getJobIdsForGroup(None), default=-1)

    def part(pos: int, uri: str) -> np.ndarray:
        if uri in ("part-1", "part-2"):
            raise OutputError(f"{uri} is unreadable or corrupt")
        return np.ones(4)

    with pytest.raises(OutputError, match="^part-1 is unreadable or corrupt$"):
        sums.sum_over_parts(spark, [f"part-{i}" for i in range(parts)], 4, part)
    tracker = spark.sparkContext.statusTracker()
    ours = [j for j in tracker.getJobIdsForGroup(None) if j > last_before]
    assert ours and all(tracker.getJobInfo(j).status == "SUCCEEDED" for j in ours)


def test_the_pca_refuses_non_finite_embeddings_and_says_how_many(spark, tmp_path) -> None:
    """An output embedded before `not_finite` existed (or by hand) may hold NaN rows: the Gramian counts them and
    the PCA stops in one line that says how many, instead of publishing NaN components (or blaming numpy)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fruitpipe.pipeline import reduce

    x = np.random.default_rng(0).random((10, 4)).astype(np.float32)
    x[3, 1], x[7, 0] = np.nan, np.inf
    path = tmp_path / "part-00000.parquet"
    pq.write_table(pa.table({"features": pa.array(list(x), pa.list_(pa.float32()))}), path)
    with pytest.raises(OutputError, match=r"^2 of 10 embeddings hold NaN or infinite features"):
        reduce.gramian(spark, [str(path)], 4)
    pq.write_table(pa.table({"features": pa.array(list(np.delete(x, [3, 7], axis=0)), pa.list_(pa.float32()))}),
                   path)
    n, sums, gram = reduce.gramian(spark, [str(path)], 4)
    good = np.delete(x, [3, 7], axis=0).astype(np.float64)
    assert n == 8 and np.allclose(sums, good.sum(0)) and np.allclose(gram, good.T @ good)
