"""Reduce stage: PCA on the executors (a distributed Gramian, numpy eigh on the driver), the explained-variance
curve, the Spark ML PCAModel, reduced vectors as Parquet."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from fruitpipe import storage
from fruitpipe.errors import FruitpipeError, OutputError
from fruitpipe.pipeline.frames import over_files, part_batches
from fruitpipe.pipeline.sums import sum_over_parts
from fruitpipe.schemas import REDUCED_SCHEMA
from fruitpipe.vectors import to_list_array, to_matrix

log = logging.getLogger(__name__)

#: Spark job group of every job of the reduce stage (the Gramian, the projection with its check).
JOB_GROUP = "fruitpipe-reduce"
#: The fitted PCA as a Spark ML PCAModel directory, under pca/.
SPARK_MODEL_DIR = "spark_model"

@dataclass(frozen=True)
class PcaFit:
    """A fitted PCA: all components (dim x m, columns by decreasing variance) and their variance shares."""

    components: np.ndarray
    explained: np.ndarray
    n_samples: int

    @property
    def cumulative(self) -> np.ndarray:
        """Cumulative explained-variance share per number of components."""
        return np.cumsum(self.explained)


def choose_k(explained: np.ndarray, k: int, variance: float | None) -> int:
    """The k to keep: the fixed `k`, or the fewest components whose cumulative share reaches `variance`."""
    if variance is None:
        return min(k, len(explained))
    cumulative = np.cumsum(explained)
    # A tolerance for float round-off: a target of 1.0 is met by the cumulative sum 0.9999999999.
    reached = np.nonzero(cumulative >= variance - 1e-9)[0]
    return int(reached[0] + 1) if len(reached) else len(explained)


def project(features: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Reduced vectors = features @ components, exactly what Spark ML's PCAModel.transform computes
    (it does not subtract the mean); shared by the batch job and the serving path."""
    return (np.asarray(features, dtype=np.float64) @ components).astype(np.float32)


def embeddings_df(spark: Any, files: list[str]) -> Any:
    """A DataFrame (id, uri, label, split, features) read from Parquet part files by the executors via
    pyarrow.fs, so local paths and s3:// work the same without Hadoop's S3 connector. One partition per part
    file (at most --partition-size rows) keeps each task's memory flat as the input grows: Spark's own reader
    was 1.8 s faster on the sample but packed up to 128 MB per partition, and a worker's peak RSS then grew
    1.37x from 5,280 to 52,800 images (docs/performance.md)."""

    def read(items: Iterator[tuple[int, str]]) -> Iterator[pa.RecordBatch]:
        for _pos, uri in items:
            yield from part_batches(uri, ["id", "uri", "label", "split", "features"])

    return over_files(spark, files, len(files), read,
                      "id string, uri string, label string, split string, features array<float>")


def gramian(spark: Any, files: list[str], dim: int) -> tuple[int, np.ndarray, np.ndarray]:
    """(rows, column sums, X^T X) of the embeddings' `features`, in float64: each task reads its part files'
    features straight from storage (pyarrow.fs, a batch at a time) and sums them in numpy (sum_over_parts). No
    Spark rows are made of the 1280 floats: going through a DataFrame and its disk cache cost 7.7 of the fit's 8.6 s
    on the sample."""

    def partial(_pos: int, uri: str) -> np.ndarray:
        n, bad, sums, gram = 0, 0, np.zeros(dim), np.zeros((dim, dim))
        for batch in part_batches(uri, ["features"]):
            x = to_matrix(batch.column(0)).astype(np.float64)
            finite = np.isfinite(x).all(axis=1)
            bad += int((~finite).sum())
            x = x[finite]
            if len(x):
                n += len(x)
                sums += x.sum(axis=0)
                gram += x.T @ x
        return np.concatenate([[float(n), float(bad)], sums, gram.ravel()])

    total = sum_over_parts(spark, files, 2 + dim + dim * dim, partial)
    n, bad = int(total[0]), int(total[1])
    if bad:
        raise OutputError(f"{bad} of {n + bad} embeddings hold NaN or infinite features (the model overflowed on "
                          "them: an fp16 or badly quantised --model-path export?); nothing was fitted. `fruitpipe "
                          "run` rejects such images as not_finite: re-embed them with a model that gives finite "
                          "outputs, or drop them from the output")
    return n, total[2:dim + 2], total[dim + 2:].reshape(dim, dim)


def pca_from_gramian(n: int, sums: np.ndarray, gram: np.ndarray, blas_threads: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(components, explained shares) of the sample covariance, as Spark ML's PCA defines them (eigenvectors by
    decreasing eigenvalue, eigenvalue / their sum), with numpy's LAPACK (shipped in its wheel: no system BLAS).
    `blas_threads` caps the BLAS threads of the eigendecomposition (None: the BLAS's own default)."""
    from threadpoolctl import threadpool_limits

    mean = sums / n
    cov = (gram - n * np.outer(mean, mean)) / (n - 1)
    with threadpool_limits(blas_threads, user_api="blas"):
        values, vectors = np.linalg.eigh((cov + cov.T) / 2)
    order = np.argsort(values)[::-1]
    values = np.clip(values[order], 0.0, None)
    return orient(vectors[:, order]), values / values.sum()


def too_few(n: int, where: str) -> OutputError:
    """The error for an output whose embeddings are too few for a PCA."""
    return OutputError(f"PCA needs at least 2 embedded images and {where} has {n}: add images to the input, or use "
                       "`fruitpipe embed` alone")


def fit_pca(spark: Any, files: list[str], dim: int, where: str = "the output") -> PcaFit:
    """Fit PCA with every component (dim), so the whole explained-variance curve is known: the covariance is summed
    on the executors (gramian), decomposed on the driver (numpy.linalg.eigh). Its check runs with the projection
    (project_parts), which reads the embeddings anyway. `where` (the output) names it in the too-few error.

    In local mode the driver shares its cores with the executors, which are busy with the run's accounting while
    the eigendecomposition runs: there OpenBLAS's threads wait on each other, and one thread was faster (1280 x
    1280 on 2 cores: 0.47-0.61 s against 1.0 s; 0.30 s against 0.22 s on idle cores). A cluster's driver has its
    own cores and keeps the BLAS default."""
    n, sums, gram = gramian(spark, files, dim)
    if n < 2:
        raise too_few(n, where)
    shared_cores = spark.sparkContext.master.startswith("local")
    components, explained = pca_from_gramian(n, sums, gram, 1 if shared_cores else None)
    return PcaFit(components=components, explained=explained, n_samples=n)


def orient(components: np.ndarray) -> np.ndarray:
    """Fix each component's sign so that its largest loading (in absolute value) is positive.

    A principal axis is only defined up to its sign, and the eigensolver's choice can flip with the order in which
    rows were summed: the same embeddings read from S3 and from a local folder once gave reduced vectors that
    differed by a sign. With this convention they agree, run after run.
    """
    cols = np.arange(components.shape[1])
    signs = np.sign(components[np.argmax(np.abs(components), axis=0), cols])
    signs[signs == 0] = 1.0
    return components * signs


class PcaCheckError(FruitpipeError):
    """The fitted PCA disagrees with the variance of the data projected on its own components."""


def project_parts(spark: Any, files: list[str], probe: np.ndarray,
                  kept: np.ndarray | None = None, where: str | None = None) -> tuple[int, np.ndarray]:
    """One pass over the embeddings' part files on the executors: with `kept` and `where`, each part's reduced vectors
    (features @ kept) are written as the part of the same position under `where`; in the same read, the variance
    along each `probe` component is measured (plain float64 sums in numpy: no LAPACK involved). Returns the row
    count and those variances as shares of the total variance."""
    d, m = probe.shape

    def one(pos: int, uri: str) -> np.ndarray:
        acc = [np.zeros(d), np.zeros(d), np.zeros(m), np.zeros(m)]
        n = 0
        pieces = []
        columns = ["features"] if where is None else ["id", "uri", "label", "split", "features"]
        for batch in part_batches(uri, columns):
            if not batch.num_rows:
                continue
            x32 = to_matrix(batch.column("features"))
            x = x32.astype(np.float64)
            p = x @ probe
            n += len(x)
            for i, v in enumerate((x.sum(0), (x * x).sum(0), p.sum(0), (p * p).sum(0))):
                acc[i] += v
            if where is not None and kept is not None:
                pieces.append(pa.table(
                    {"id": batch.column("id"), "uri": batch.column("uri"), "label": batch.column("label"),
                     "split": batch.column("split"), "pca": to_list_array(project(x32, kept))},
                    schema=REDUCED_SCHEMA,
                ))
        if pieces and where is not None:
            storage.write_parquet(pa.concat_tables(pieces), storage.join(where, f"part-{pos:05d}.parquet"))
        return np.concatenate([[float(n)], *acc])

    total = sum_over_parts(spark, files, 1 + 2 * d + 2 * m, one)
    n = int(total[0])
    if n < 2:
        raise too_few(n, "this output")
    sx, sxx, sp, spp = np.split(total[1:], [d, 2 * d, 2 * d + m])
    column_var = (sxx - sx * sx / n) / (n - 1)
    projected_var = (spp - sp * sp / n) / (n - 1)
    return n, projected_var / column_var.sum()


#: Components whose claimed variance share the check measures on the data.
CHECKED_COMPONENTS = 20


def check_pca(measured: np.ndarray, claimed: np.ndarray, rtol: float = 1e-4) -> None:
    """Guard against a wrong eigendecomposition: each checked component must hold the share of the variance it
    claims, as measured by projecting the data on it (project_parts). Spark ML's pure-Java LAPACK fallback once
    returned a nearly flat spectrum for 1280-d embeddings of 240 photos; the fit is numpy's now, and this check
    stays as the proof that the published curve describes the data."""
    claimed = np.asarray(claimed)[: len(measured)]
    if not np.allclose(measured, claimed, rtol=rtol, atol=1e-9):
        worst = int(np.argmax(np.abs(measured - claimed)))
        raise PcaCheckError(
            f"the PCA is inconsistent: component {worst + 1} claims {claimed[worst]:.6f} of the variance but the "
            f"data projected on it holds {measured[worst]:.6f}; nothing was published (check the numpy install, "
            "then re-run)"
        )


def spark_pca_model(spark: Any, components: np.ndarray, explained: np.ndarray) -> Any:
    """A pyspark.ml.feature.PCAModel holding `components` (dim x k) and their variance shares (k): its transform()
    of a `features` vector column gives `pca` = features @ components, the reduced vectors of this output."""
    from pyspark.ml.common import _py2java
    from pyspark.ml.feature import PCAModel
    from pyspark.ml.linalg import DenseMatrix, DenseVector

    sc = spark.sparkContext
    d, k = components.shape
    pc = DenseMatrix(d, k, np.asarray(components, np.float64).ravel(order="F").tolist())  # column-major
    variance = DenseVector(np.asarray(explained[:k], np.float64).tolist())
    java = sc._jvm.org.apache.spark.ml.feature.PCAModel(f"PCA_{uuid.uuid4().hex[:12]}", _py2java(sc, pc),
                                                        _py2java(sc, variance))
    model = PCAModel(java)
    model._set(k=k)  # PCAModel has no setK; transform() checks k against the matrix
    return model.setInputCol("features").setOutputCol("pca")
