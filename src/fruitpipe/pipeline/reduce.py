"""Reduce stage: PCA on the executors (a distributed Gramian, numpy eigh on the driver), the explained-variance
curve, the Spark ML PCAModel, reduced vectors as Parquet."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from fruitpipe import storage
from fruitpipe.errors import FruitpipeError
from fruitpipe.schemas import REDUCED_SCHEMA
from fruitpipe.spark import ArrowFn
from fruitpipe.storage import StorageOptions
from fruitpipe.vectors import to_list_array, to_matrix

log = logging.getLogger(__name__)

#: Spark job group of every job of the reduce stage (fit, check, projection).
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


def embeddings_df(spark: Any, files: list[str], opts: StorageOptions) -> Any:
    """A DataFrame (id, uri, label, split, features) read from Parquet part files by the executors via
    pyarrow.fs, so local paths and s3:// work the same without Hadoop's S3 connector. One partition per part
    file (at most --partition-size rows) keeps each task's memory flat as the input grows: Spark's own reader
    was 1.8 s faster on the sample but packed up to 128 MB per partition, and a worker's peak RSS then grew
    1.37x from 5,280 to 52,800 images (docs/performance.md)."""

    def read(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            for uri in batch.column(0).to_pylist():
                yield from storage.read_parquet(uri, opts).to_batches(max_chunksize=2048)

    sc = spark.sparkContext
    paths = spark.createDataFrame(sc.parallelize([(f,) for f in files], max(1, len(files))), "path string")
    return paths.mapInArrow(read, "id string, uri string, label string, split string, features array<float>")


def gramian(df: object, dim: int) -> tuple[int, np.ndarray, np.ndarray]:
    """(rows, column sums, X^T X) of the `features` column, in float64: summed per partition on the executors in
    numpy, one Arrow batch at a time (a worker holds one dim x dim sum, whatever the number of rows), then combined
    by Spark in a tree (treeReduce), so the driver receives a few partial sums, not one per partition."""

    def partial(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        n, sums, gram = 0, np.zeros(dim), np.zeros((dim, dim))
        for batch in batches:
            x = to_matrix(batch.column("features")).astype(np.float64)
            if len(x):
                n += len(x)
                sums += x.sum(axis=0)
                gram += x.T @ x
        packed = np.concatenate([[float(n)], sums, gram.ravel()])
        yield pa.RecordBatch.from_pydict({"part": [packed.tobytes()]}, schema=pa.schema([("part", pa.binary())]))

    parts = df.select("features").mapInArrow(partial, "part binary").rdd  # type: ignore[attr-defined]
    total = parts.map(lambda row: np.frombuffer(row[0], dtype=np.float64)).treeReduce(np.add, depth=2)
    return int(total[0]), total[1:dim + 1], total[dim + 1:].reshape(dim, dim)


def pca_from_gramian(n: int, sums: np.ndarray, gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(components, explained shares) of the sample covariance, as Spark ML's PCA defines them (eigenvectors by
    decreasing eigenvalue, eigenvalue / their sum), with numpy's LAPACK (shipped in its wheel: no system BLAS)."""
    mean = sums / n
    cov = (gram - n * np.outer(mean, mean)) / (n - 1)
    values, vectors = np.linalg.eigh((cov + cov.T) / 2)
    order = np.argsort(values)[::-1]
    values = np.clip(values[order], 0.0, None)
    return orient(vectors[:, order]), values / values.sum()


def fit_pca(df: object, dim: int, timings: dict[str, float] | None = None) -> PcaFit:
    """Fit PCA with every component (dim), so the whole explained-variance curve is known, then check it: the
    covariance is summed on the executors (gramian), decomposed on the driver (numpy.linalg.eigh). Pass a persisted
    `df`: the fit and the check each read it once. Adds reduce_fit and reduce_check (seconds) to `timings`."""
    import time

    t0 = time.perf_counter()
    n, sums, gram = gramian(df, dim)
    components, explained = pca_from_gramian(n, sums, gram)
    t1 = time.perf_counter()
    checked = check_pca(df, components, explained)
    if checked != n:
        raise PcaCheckError(f"the PCA read {n} rows and its check {checked}: the input changed during the fit; "
                            "re-run the same command")
    if timings is not None:
        timings["reduce_fit"], timings["reduce_check"] = t1 - t0, time.perf_counter() - t1
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


def projected_variance_shares(df: object, components: np.ndarray) -> tuple[int, np.ndarray]:
    """Row count, and the variance of the data along each given component as a share of the total variance
    (one Spark pass, plain float64 sums in numpy: no LAPACK involved)."""
    d, m = components.shape

    def moments(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        acc = [np.zeros(d), np.zeros(d), np.zeros(m), np.zeros(m)]
        n = 0
        for batch in batches:
            x = to_matrix(batch.column("features")).astype(np.float64)
            if not len(x):
                continue
            p = x @ components
            n += len(x)
            for i, v in enumerate((x.sum(0), (x * x).sum(0), p.sum(0), (p * p).sum(0))):
                acc[i] += v
        yield pa.RecordBatch.from_pydict({"n": [n], "sums": [np.concatenate(acc).tolist()]})

    rows = df.select("features").mapInArrow(moments, "n long, sums array<double>").collect()  # type: ignore[attr-defined]
    n = sum(r["n"] for r in rows)
    total = np.sum([np.asarray(r["sums"]) for r in rows], axis=0)
    sx, sxx, sp, spp = np.split(total, [d, 2 * d, 2 * d + m])
    column_var = (sxx - sx * sx / n) / (n - 1)
    projected_var = (spp - sp * sp / n) / (n - 1)
    return n, projected_var / column_var.sum()


def check_pca(df: object, components: np.ndarray, explained: np.ndarray, first: int = 20,
              rtol: float = 1e-4) -> int:
    """Guard against a wrong eigendecomposition: each of the first components must hold the share of the variance it
    claims, measured by projecting the data on it (plain float64 sums). Spark ML's pure-Java LAPACK fallback once
    returned a nearly flat spectrum for 1280-d embeddings of 240 photos; the fit is numpy's now, and this check stays
    as the proof that the published curve describes the data. Returns the number of rows."""
    m = min(first, components.shape[1])
    n, measured = projected_variance_shares(df, components[:, :m])
    claimed = explained[:m]
    if not np.allclose(measured, claimed, rtol=rtol, atol=1e-9):
        worst = int(np.argmax(np.abs(measured - claimed)))
        raise PcaCheckError(
            f"the PCA is inconsistent: component {worst + 1} claims {claimed[worst]:.6f} of the variance but the "
            f"data projected on it holds {measured[worst]:.6f}; nothing was published (check the numpy install, "
            "then re-run)"
        )
    return n


def spark_pca_model(spark: Any, components: np.ndarray, explained: np.ndarray) -> Any:
    """A pyspark.ml.feature.PCAModel holding `components` (dim x k) and their variance shares (k): its transform()
    of a `features` vector column gives `pca` = features @ components, the reduced vectors of this output."""
    import uuid

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


def make_project_fn(components: np.ndarray, staging_uri: str, opts: StorageOptions) -> ArrowFn:
    """mapInArrow function: project one partition's embeddings and write them as one reduced part file."""

    def project_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        assert ctx is not None, "runs inside a Spark task"
        part = f"part-{ctx.partitionId():05d}.parquet"
        pieces = []
        for batch in batches:  # one Arrow batch of features at a time; only the small reduced rows are kept
            if batch.num_rows:
                pieces.append(pa.table(
                    {
                        "id": batch.column("id"), "uri": batch.column("uri"), "label": batch.column("label"),
                        "split": batch.column("split"),
                        "pca": to_list_array(project(to_matrix(batch.column("features")), components)),
                    },
                    schema=REDUCED_SCHEMA,
                ))
        rows = sum(p.num_rows for p in pieces)
        if rows:
            storage.write_parquet(pa.concat_tables(pieces), storage.join(staging_uri, part), opts)
        yield pa.RecordBatch.from_pydict({"rows": [rows]}, schema=pa.schema([("rows", pa.int64())]))

    return project_partition


def variance_report(fit: PcaFit, k: int, variance: float | None) -> dict[str, object]:
    """The content of explained_variance.json."""
    return {
        "k": k,
        "selected_by": "variance" if variance is not None else "k",
        "target_variance": variance,
        "explained_at_k": float(fit.cumulative[k - 1]),
        "n_samples": fit.n_samples,
        "dim": int(fit.components.shape[0]),
        "per_component": [float(v) for v in fit.explained],
        "cumulative": [float(v) for v in fit.cumulative],
    }


def scree_png(explained: np.ndarray, n_samples: int, k: int, show: int = 100) -> bytes:
    """Scree plot: per-component share (bars) and cumulative share (line), the chosen k marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    explained = np.asarray(explained, dtype=np.float64)
    cumulative = np.cumsum(explained)
    m = min(show, len(explained))
    xs = np.arange(1, m + 1)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.bar(xs, explained[:m] * 100, color="#4c72b0", label="per component")
    ax.set_xlabel("principal component")
    ax.set_ylabel("explained variance (%)")
    ax2 = ax.twinx()
    ax2.plot(xs, cumulative[:m] * 100, color="#dd8452", label="cumulative")
    ax2.set_ylabel("cumulative (%)")
    ax2.set_ylim(0, 100)
    ax2.axvline(k, color="gray", linestyle="--")
    ax2.annotate(f"k={k}: {cumulative[k - 1] * 100:.1f} %", (k, cumulative[k - 1] * 100),
                 textcoords="offset points", xytext=(6, -14))
    ax.set_title(f"PCA explained variance ({n_samples} embeddings, first {m} of {len(explained)} components)")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def components_npy(components: np.ndarray) -> bytes:
    """The kept components (dim x k, float64) as .npy bytes; load with numpy.load."""
    buf = io.BytesIO()
    np.save(buf, components)
    return buf.getvalue()


def write_pca_artifacts(pca_uri: str, fit: PcaFit, k: int, variance: float | None, fingerprint: dict[str, object],
                        opts: StorageOptions) -> dict[str, object]:
    """explained_variance.json, scree.png and components.npy under `pca_uri`; returns the report."""
    import hashlib

    report = variance_report(fit, k, variance)
    report["fingerprint"] = fingerprint
    raw = components_npy(fit.components[:, :k])
    # The basis's fingerprint is the sha256 of components.npy: what --pca-from of a later run records.
    report["basis"] = {"from": "fitted on this output", "fingerprint": hashlib.sha256(raw).hexdigest()}
    storage.write_bytes(storage.join(pca_uri, "explained_variance.json"),
                        json.dumps(report, indent=2).encode(), opts)
    storage.write_bytes(storage.join(pca_uri, "scree.png"), scree_png(fit.explained, fit.n_samples, k), opts)
    storage.write_bytes(storage.join(pca_uri, "components.npy"), raw, opts)
    return report


@dataclass(frozen=True)
class Basis:
    """A PCA fitted by another output (--pca-from): its components, its explained_variance.json, where it came
    from and its fingerprint (sha256 of components.npy's bytes)."""

    components: np.ndarray
    report: dict[str, Any]
    source: str
    fingerprint: str


def load_basis(other: str, opts: StorageOptions, model_sha256: str, dim: int | None,
               what: str = "--pca-from") -> Basis:
    """The committed PCA of output `other` (named `what` in messages), checked to come from the same embedding model
    and, when `dim` is given, to have that many rows; FruitpipeError with the fix otherwise."""
    import hashlib

    from fruitpipe.output import SUCCESS, RunDir

    other = storage.normalize(other)
    rundir = RunDir(other, opts)
    if rundir.read_marker() is None or not storage.exists(rundir.join(SUCCESS), opts) \
            or rundir.reduce_entry() is None:
        raise FruitpipeError(f"{what} {other} is not a complete output with a PCA: point it at an OUTPUT "
                             "that `fruitpipe run` or `fruitpipe reduce` finished")
    theirs = (rundir.read_marker() or {}).get("model_sha256")
    if theirs != model_sha256:
        raise FruitpipeError(f"{what} {other} was fitted on embeddings of another model ({str(theirs)[:12]}... "
                             f"instead of {model_sha256[:12]}...): its basis does not apply; use an output of the "
                             "same model")
    raw = storage.read_bytes(storage.join(other, "pca", "components.npy"), opts)
    components = np.load(io.BytesIO(raw))
    if components.ndim != 2 or (dim is not None and components.shape[0] != dim):
        raise FruitpipeError(f"{what} {other}: pca/components.npy has shape {components.shape}, expected "
                             f"({dim or 'dim'}, k): re-run `fruitpipe reduce {other}`")
    report = json.loads(storage.read_bytes(storage.join(other, "pca", "explained_variance.json"), opts))
    return Basis(components, report, other, hashlib.sha256(raw).hexdigest())


def write_basis_artifacts(pca_uri: str, basis: Basis, n_samples: int, measured: np.ndarray,
                          fingerprint: dict[str, object], opts: StorageOptions) -> dict[str, object]:
    """pca/ of an output projected with another output's basis: the same components.npy and scree.png, and an
    explained_variance.json that keeps the basis's curve and adds the variance shares measured on this output's
    embeddings (`measured_on_this_output`)."""
    k = int(basis.components.shape[1])
    report = dict(basis.report)
    report.update({
        "k": k, "selected_by": "pca_from",
        "basis": {"from": basis.source, "fingerprint": basis.fingerprint, "n_samples": basis.report.get("n_samples")},
        "n_samples": n_samples,
        "measured_on_this_output": {"per_component": [float(v) for v in measured],
                                    "explained_at_k": float(np.sum(measured))},
        "fingerprint": fingerprint,
    })
    storage.write_bytes(storage.join(pca_uri, "explained_variance.json"), json.dumps(report, indent=2).encode(), opts)
    explained = np.asarray(basis.report.get("per_component") or measured, dtype=np.float64)
    storage.write_bytes(storage.join(pca_uri, "scree.png"),
                        scree_png(explained, int(basis.report.get("n_samples") or n_samples), k), opts)
    storage.write_bytes(storage.join(pca_uri, "components.npy"), components_npy(basis.components), opts)
    return report


def load_components(pca_uri: str, opts: StorageOptions) -> np.ndarray:
    """The fitted model's components (dim x k) written by a run, for projecting new embeddings."""
    return np.load(io.BytesIO(storage.read_bytes(storage.join(pca_uri, "components.npy"), opts)))
