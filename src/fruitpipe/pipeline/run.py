"""One run: claim the output, list, embed what is new, reduce, then publish run.json and _SUCCESS."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import platform
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc

import fruitpipe
from fruitpipe import storage
from fruitpipe.config import Config
from fruitpipe.errors import FruitpipeError, OutputError
from fruitpipe.models import get_spec, resolve_model
from fruitpipe.models.fetch import ResolvedModel
from fruitpipe.models.quantize import output_int8_model
from fruitpipe.pipeline import embed as embed_mod
from fruitpipe.pipeline import reduce as reduce_mod
from fruitpipe.pipeline.listing import Listing, check_input, list_images
from fruitpipe.spark import JobProgress, spark_session
from fruitpipe.storage import StorageOptions

log = logging.getLogger(__name__)

MARKER = "_fruitpipe.json"
SUCCESS = "_SUCCESS"
STAGING = "_staging"


@dataclass
class RunResult:
    """What a run did: the content of run.json."""

    output: str
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, Any]:
        """The counts section of run.json."""
        return self.report["counts"]


class _LazySpark:
    """Starts Spark on first use only, so a run with nothing to do never pays the JVM start."""

    def __init__(self, config: Config, stack: contextlib.ExitStack) -> None:
        self._config = config
        self._stack = stack
        self.session: Any = None
        self.start_seconds = 0.0

    def get(self) -> Any:
        if self.session is None:
            t0 = time.perf_counter()
            self.session = self._stack.enter_context(
                spark_session(self._config.master, "fruitpipe", self._config.task_cpus, self._config.spark_conf)
            )
            self.start_seconds = time.perf_counter() - t0
        return self.session


#: Fingerprint keys written only when they differ from this default, so older outputs keep matching.
_FINGERPRINT_DEFAULTS = {"precision": "fp32"}


def _fingerprint(config: Config, model: ResolvedModel) -> dict[str, Any]:
    """What makes two runs' embeddings comparable: same input, same model bytes, same input size, precision."""
    fingerprint = {
        "input": storage.normalize(config.input),
        "model": config.model,
        "model_sha256": model.sha256,
        "input_size": model.spec.input_size,
    }
    if config.precision != _FINGERPRINT_DEFAULTS["precision"]:
        fingerprint["precision"] = config.precision
    return fingerprint


def claim_output(out: str, fingerprint: dict[str, Any], overwrite: bool, opts: StorageOptions) -> None:
    """Make `out` ours: refuse an output made with another input or model (unless overwrite), mark it ours."""
    marker = storage.join(out, MARKER)
    if storage.exists(marker, opts):
        previous = json.loads(storage.read_bytes(marker, opts))
        if previous != fingerprint:
            if not overwrite:
                diff = ", ".join(
                    f"{k} was {previous.get(k, _FINGERPRINT_DEFAULTS.get(k))!r} "
                    f"(now {fingerprint.get(k, _FINGERPRINT_DEFAULTS.get(k))!r})"
                    for k in sorted(set(previous) | set(fingerprint)) if previous.get(k) != fingerprint.get(k)
                )
                raise OutputError(
                    f"output {out} belongs to another configuration ({diff}): choose a new OUTPUT or pass --overwrite"
                )
            log.warning("--overwrite: deleting %s made with another configuration", out)
            storage.delete(out, opts)
    elif storage.exists(out, opts) and any(True for _ in storage.list_files(out, opts)):
        if not overwrite:
            raise OutputError(f"output {out} exists and is not a fruitpipe output: choose an empty or new OUTPUT")
        storage.delete(out, opts)
    storage.write_bytes(marker, json.dumps(fingerprint, indent=2).encode(), opts)


def _read_index(dataset_uri: str, opts: StorageOptions, columns: list[str]) -> pa.Table | None:
    files = storage.parquet_files(dataset_uri, opts) if storage.exists(dataset_uri, opts) else []
    if not files:
        return None
    return pa.concat_tables([storage.read_parquet(f, opts, columns=columns) for f in files])


def _commit_staged(staging: str, out: str, dataset: str, token: str, opts: StorageOptions) -> int:
    """Move staged part files of `dataset` into the output under unique names; returns how many."""
    files = storage.parquet_files(storage.join(staging, dataset), opts) if storage.exists(
        storage.join(staging, dataset), opts) else []
    for src in files:
        name = src.rsplit("/", 1)[1]
        storage.move(src, storage.join(out, dataset, f"{token}-{name}"), opts)
    return len(files)


def _ensure_dataset(uri: str, schema: pa.Schema, opts: StorageOptions) -> None:
    if not storage.exists(uri, opts) or not storage.parquet_files(uri, opts):
        storage.write_parquet(schema.empty_table(), storage.join(uri, "part-empty.parquet"), opts)


def _replace_dir(src: str, dst: str, opts: StorageOptions) -> None:
    """Replace directory `dst` by `src` (both fully written before; the reader is protected by _SUCCESS)."""
    storage.delete(dst, opts)
    for f, _ in list(storage.list_files(src, opts)):
        storage.move(f, dst + f[len(src):], opts)


def _versions(spark: Any) -> dict[str, str]:
    import numpy
    import onnxruntime
    import PIL
    import pyspark

    versions = {
        "fruitpipe": fruitpipe.__version__,
        "python": platform.python_version(),
        "pyspark": pyspark.__version__,
        "onnxruntime": onnxruntime.__version__,
        "pyarrow": pa.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
    }
    if spark is not None:
        versions["java"] = str(spark.sparkContext._jvm.System.getProperty("java.version"))
    return versions


_NO_INFERENCE = {"tasks": 0, "workers": 0, "sessions_built": 0, "max_sessions_per_worker": 0,
                 "threads_per_task": 0}


def _inference_stats(index: pa.Table) -> dict[str, int]:
    if index.num_rows == 0:
        return dict(_NO_INFERENCE)
    per_pid: dict[int, int] = {}
    for pid, built in zip(index.column("pid").to_pylist(), index.column("sessions_built").to_pylist()):
        per_pid[pid] = max(per_pid.get(pid, 0), built)
    return {
        "tasks": len(set(index.column("part").to_pylist())),
        "workers": len(per_pid),
        "sessions_built": sum(per_pid.values()),
        "max_sessions_per_worker": max(per_pid.values()),
        "threads_per_task": max(index.column("threads").to_pylist()),
    }


def embed_stage(config: Config, model: ResolvedModel, spark: _LazySpark, out: str, token: str,
                opts: StorageOptions, timings: dict[str, float], listing: Listing) -> dict[str, Any]:
    """Embed the listed inputs no earlier run has handled, deduplicate, commit; returns counts."""
    emb_uri, rej_uri = storage.join(out, "embeddings"), storage.join(out, "rejects")
    done_emb = _read_index(emb_uri, opts, ["uri", "id"])
    done_rej = _read_index(rej_uri, opts, ["uri"])
    done_uris = pa.concat_arrays(
        [t.column("uri").combine_chunks() for t in (done_emb, done_rej) if t is not None] or [pa.array([], pa.string())]
    )
    todo = listing.manifest.filter(pc.invert(pc.is_in(listing.manifest.column("uri"), done_uris)))
    log.info("%d listed, %d already done, %d to embed", listing.count, listing.count - todo.num_rows, todo.num_rows)

    inference = dict(_NO_INFERENCE)
    embedded_now = rejected_now = committed = 0
    session = spark.get() if todo.num_rows else None  # JVM start is timed apart from the stage
    t0 = time.perf_counter()
    if todo.num_rows:
        staging = storage.join(out, STAGING, token)
        settings = embed_mod.EmbedSettings(
            model_sha256=model.sha256, input_size=model.spec.input_size, input_name=model.spec.input_name,
            output_name=model.spec.output_name, dim=model.spec.dim, batch_size=config.batch_size,
            max_pixels=config.max_pixels, staging_uri=staging, storage=opts, device=config.device,
            # Local reads take microseconds: the pool only paid off on S3 (local sweep: no gain, within noise).
            read_ahead=config.read_ahead if storage.is_s3(config.input) else 1,
        )
        index = embed_mod.run_embed_job(session, todo, settings, model.read_bytes(), config.partition_size,
                                        config.quiet)
        timings["embed_job"] = time.perf_counter() - t0
        inference = _inference_stats(index)
        embedded_now = int(pc.sum(pc.equal(index.column("status"), "embedded")).as_py() or 0)
        rejected_now = index.num_rows - embedded_now
        dups = embed_mod.find_duplicates(index, done_emb)
        if dups:
            embedded_now -= len(dups)
            rejected_now += len(dups)
            log.info("%d duplicate input(s) (same bytes as another): recorded in rejects", len(dups))
            by_part: dict[str, list[str]] = {}
            rows = index.filter(pc.is_in(index.column("uri"), pa.array(list(dups))))
            for uri, part in zip(rows.column("uri").to_pylist(), rows.column("part").to_pylist()):
                by_part.setdefault(storage.join(staging, "embeddings", part), []).append(uri)
            embed_mod.drop_rows_from_parts(session, by_part, opts)
            dup_rejects = pa.table(
                {
                    "id": rows.column("id"), "uri": rows.column("uri"), "label": rows.column("label"),
                    "split": rows.column("split"), "reason": pa.array(["duplicate"] * rows.num_rows),
                    "detail": pa.array([f"same bytes as {dups[u]}" for u in rows.column("uri").to_pylist()]),
                },
                schema=embed_mod.REJECTS_SCHEMA,
            )
            storage.write_parquet(dup_rejects, storage.join(staging, "rejects", "part-duplicates.parquet"), opts)
        # Publish: embeddings first, then rejects; an interrupted commit is finished by the next run's resume.
        committed = _commit_staged(staging, out, "embeddings", token, opts)
        _commit_staged(staging, out, "rejects", token, opts)
        storage.delete(staging, opts)
    # Readers always find both datasets with their schema, even when a run had nothing to put in one.
    _ensure_dataset(emb_uri, embed_mod.embeddings_schema(model.spec.dim), opts)
    _ensure_dataset(rej_uri, embed_mod.REJECTS_SCHEMA, opts)
    if committed:  # the embeddings changed, so any earlier PCA no longer describes them
        for stale in ("pca", "reduced"):
            storage.delete(storage.join(out, stale), opts)
    timings["embed"] = time.perf_counter() - t0

    final_emb = _read_index(emb_uri, opts, ["uri", "id"])
    final_rej = _read_index(rej_uri, opts, ["uri", "reason"])
    listed = listing.manifest.column("uri")
    emb_listed = 0 if final_emb is None else pc.sum(pc.is_in(final_emb.column("uri"), listed)).as_py() or 0
    rej_listed = 0 if final_rej is None else pc.sum(pc.is_in(final_rej.column("uri"), listed)).as_py() or 0
    all_ids = [] if final_emb is None else final_emb.column("id").to_pylist()
    reasons = Counter(final_rej.column("reason").to_pylist()) if final_rej is not None else Counter()
    n_rows = (final_emb.num_rows if final_emb is not None else 0) + (final_rej.num_rows if final_rej is not None else 0)
    return {
        "listed": listing.count,
        "ignored_outside_class_folders": len(listing.ignored),
        "embedded": emb_listed,
        "rejected": rej_listed,
        "accounted": emb_listed + rej_listed == listing.count,
        "not_listed_anymore": n_rows - emb_listed - rej_listed,
        "embedded_this_run": embedded_now,
        "rejected_this_run": rejected_now,
        "skipped_already_done": listing.count - todo.num_rows,
        "rejects_by_reason": dict(sorted(reasons.items())),
        "embedding_ids_digest": hashlib.sha256("\n".join(sorted(all_ids)).encode()).hexdigest(),
        "inference": inference,
    }


def reduce_stage(config: Config, model: ResolvedModel, spark: _LazySpark, out: str, token: str,
                 opts: StorageOptions, timings: dict[str, float], ids_digest: str) -> dict[str, Any]:
    """Fit PCA on every embedding, write pca/ and reduced/; skipped when they already match the embeddings."""
    t0 = time.perf_counter()
    pca_uri, reduced_uri = storage.join(out, "pca"), storage.join(out, "reduced")
    fingerprint = {"embedding_ids_digest": ids_digest, "k": config.k, "variance": config.variance}
    report_uri = storage.join(pca_uri, "explained_variance.json")
    if storage.exists(report_uri, opts) and storage.exists(reduced_uri, opts):
        previous = json.loads(storage.read_bytes(report_uri, opts))
        if previous.get("fingerprint") == fingerprint:
            log.info("PCA and reduced vectors are up to date; nothing to reduce")
            timings["reduce"] = time.perf_counter() - t0
            return {**_pca_summary(previous), "skipped": True}
    files = storage.parquet_files(storage.join(out, "embeddings"), opts)
    n_rows = reduce_mod.count_rows(files, opts)
    if n_rows < 2:
        raise OutputError(f"PCA needs at least 2 embedded images and {out} has {n_rows}: add images to the input, "
                          "or use `fruitpipe embed` alone")
    session = spark.get()
    t0 = time.perf_counter()
    from pyspark.storagelevel import StorageLevel

    # Read once, kept on local disk for the three passes (PCA fit, its check, the projection). Disk, not memory:
    # with MEMORY_AND_DISK the JVM's peak RSS grew 1.54x from 5,280 to 52,800 images (docs/performance.md).
    df = reduce_mod.embeddings_df(session, files, opts).persist(StorageLevel.DISK_ONLY)
    try:
        fit = reduce_mod.fit_pca(df, model.spec.dim, timings)
        k = reduce_mod.choose_k(fit.explained, config.k, config.variance)
        staging = storage.join(out, STAGING, token)
        t1 = time.perf_counter()
        report = reduce_mod.write_pca_artifacts(storage.join(staging, "pca"), fit, k, config.variance, fingerprint,
                                                opts)
        timings["reduce_artifacts"] = time.perf_counter() - t1
        project = reduce_mod.make_project_fn(fit.components[:, :k], storage.join(staging, "reduced"), opts)
        t1 = time.perf_counter()
        with JobProgress(session, "fruitpipe-reduce", total=fit.n_samples, desc="reduce", quiet=config.quiet):
            df.mapInArrow(project, "rows long").collect()
        timings["reduce_project"] = time.perf_counter() - t1
    finally:
        df.unpersist()
    _replace_dir(storage.join(staging, "pca"), pca_uri, opts)
    _replace_dir(storage.join(staging, "reduced"), reduced_uri, opts)
    storage.delete(staging, opts)
    timings["reduce"] = time.perf_counter() - t0
    log.info("PCA: k=%d explains %.1f %% of the variance", k, 100 * report["explained_at_k"])
    return {**_pca_summary(report), "skipped": False}


def _pca_summary(report: dict[str, Any]) -> dict[str, Any]:
    cumulative = report["cumulative"]
    return {
        "k": report["k"],
        "selected_by": report["selected_by"],
        "explained_at_k": report["explained_at_k"],
        "cumulative_at": {str(n): cumulative[n - 1] for n in (6, 20, 50, 100) if n <= len(cumulative)},
        "n_samples": report["n_samples"],
    }


@contextlib.contextmanager
def _run_context(config: Config) -> Iterator[tuple[_LazySpark, StorageOptions]]:
    with contextlib.ExitStack() as stack:
        yield _LazySpark(config, stack), StorageOptions(config.s3_endpoint, config.region)


class JobFailedError(FruitpipeError):
    """A Spark job or a storage call failed (storage unreachable, executors lost beyond retries); nothing was
    published as complete."""


def _failure_summary(exc: BaseException) -> str:
    """The root cause of a failure in one line (the last Python or Java error line of its text)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    causes = [line for line in lines if ("Error:" in line or "Exception:" in line) and "Traceback" not in line]
    return (causes[-1] if causes else (lines[0] if lines else type(exc).__name__))[:300]


@contextlib.contextmanager
def _job_failures(out: str) -> Iterator[None]:
    """Turn a failed Spark job into a one-line FruitpipeError that says how to resume."""
    try:
        yield
    except FruitpipeError:
        raise
    except OSError as exc:  # storage unreachable or refusing, on the driver (listing, commit, run.json)
        raise JobFailedError(
            f"storage error: {_failure_summary(exc)}; nothing was published as complete (no {out}/_SUCCESS): "
            "fix the cause and re-run the same command, done work is kept"
        ) from exc
    except Exception as exc:
        from py4j.protocol import Py4JError
        from pyspark.errors import PySparkException

        if not isinstance(exc, (Py4JError, PySparkException)):
            raise
        raise JobFailedError(
            f"a Spark job failed: {_failure_summary(exc)}; nothing was published as complete (no {out}/_SUCCESS): "
            "fix the cause and re-run the same command, done work is kept"
        ) from exc


def run(config: Config, stages: tuple[str, ...] = ("embed", "reduce"), listing: Listing | None = None) -> RunResult:
    """Run the given stages on `config`, commit the outputs and return what run.json records.

    `listing` replaces the listing of config.input (a manifest made elsewhere, e.g. from a catalogue).
    """
    config.validate()
    started = time.time()
    t_total = time.perf_counter()
    out = storage.normalize(config.output)
    token = time.strftime("%Y%m%dT%H%M%S", time.gmtime(started)) + "-" + uuid.uuid4().hex[:8]
    timings: dict[str, float] = {}
    with _run_context(config) as (spark, opts), _job_failures(out):
        if "embed" in stages:
            if listing is None:
                check_input(config.input, opts)  # before the output is claimed: a wrong INPUT leaves it untouched
            model = resolve_model(get_spec(config.model), config.model_path, opts)
            fingerprint = _fingerprint(config, model)
            claim_output(out, fingerprint, config.overwrite, opts)
            if listing is None:
                t0 = time.perf_counter()
                listing = list_images(config.input, opts, config.list_threads)
                timings["list"] = time.perf_counter() - t0
            if config.precision == "int8":  # calibrated on the listing's Training images
                t0 = time.perf_counter()
                model = output_int8_model(model, listing.manifest, out, opts, config.max_pixels)
                timings["int8_model"] = time.perf_counter() - t0
        else:
            fingerprint = read_marker(out, opts)
            # Reducing needs only the embedding size: the model file itself is not fetched.
            model = ResolvedModel(get_spec(fingerprint["model"]), "", fingerprint["model_sha256"], "output")
            config = config.replace(input=fingerprint["input"], model=fingerprint["model"])
        # From here until _SUCCESS is written again, readers know the output is being changed.
        storage.delete(storage.join(out, SUCCESS), opts)
        storage.delete(storage.join(out, STAGING), opts)
        previous = _previous_report(out, opts)
        if not config.master.startswith("local") and not storage.is_s3(out):
            log.warning("OUTPUT %s is a local path: with --master %s every node must see it (shared folder)",
                        out, config.master)
        if "embed" in stages:
            counts = embed_stage(config, model, spark, out, token, opts, timings, listing)
        else:
            counts = previous.get("counts") or {}
            if "embedding_ids_digest" not in counts:
                raise OutputError(f"{out} has no run.json from an embed stage: run `fruitpipe embed` first")
        pca = reduce_stage(config, model, spark, out, token, opts, timings, counts["embedding_ids_digest"]) \
            if "reduce" in stages else previous.get("pca")
        storage.delete(storage.join(out, STAGING), opts)
        timings["spark_start"] = spark.start_seconds
        timings["total"] = time.perf_counter() - t_total
        report = {
            "fruitpipe_version": fruitpipe.__version__,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "stages": list(stages),
            "config": {**config.to_dict(), "input": fingerprint["input"], "output": out},
            "model": {"name": model.spec.name, "sha256": model.sha256, "source": model.source,
                      "precision": fingerprint.get("precision", _FINGERPRINT_DEFAULTS["precision"]),
                      "file": model.spec.filename, "dim": model.spec.dim, "input_size": model.spec.input_size},
            "versions": _versions(spark.session),
            "counts": counts,
            "pca": pca,
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
        }
        embedded_now = counts.get("embedded_this_run", 0)
        if timings.get("embed") and embedded_now:
            report["throughput_img_s"] = {"embed": round((embedded_now + counts.get("rejected_this_run", 0))
                                                         / timings["embed"], 1)}
        storage.write_bytes(storage.join(out, "run.json"), json.dumps(report, indent=2).encode(), opts)
        storage.write_bytes(storage.join(out, SUCCESS), b"", opts)
    return RunResult(output=out, report=report)


def _previous_report(out: str, opts: StorageOptions) -> dict[str, Any]:
    uri = storage.join(out, "run.json")
    return json.loads(storage.read_bytes(uri, opts)) if storage.exists(uri, opts) else {}


def read_marker(out: str, opts: StorageOptions) -> dict[str, Any]:
    """The fingerprint (input, model, sha256) of the run that owns `out`; OutputError if there is none."""
    marker = storage.join(storage.normalize(out), MARKER)
    if not storage.exists(marker, opts):
        raise OutputError(f"{out} holds no fruitpipe embeddings: run `fruitpipe embed INPUT {out}` first")
    return json.loads(storage.read_bytes(marker, opts))
