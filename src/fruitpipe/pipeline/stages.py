"""The two stages of a run: embed what is new (and commit it), reduce (fit or reuse a PCA, project, commit)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fruitpipe import storage
from fruitpipe.config import Config, task_count
from fruitpipe.models.fetch import ResolvedModel
from fruitpipe.models.wrap import wrap_uint8
from fruitpipe.monitor.resources import group_jobs, stage_peaks
from fruitpipe.output import RunDir
from fruitpipe.pipeline import bookkeeping, pca_files
from fruitpipe.pipeline import embed as embed_mod
from fruitpipe.pipeline import reduce as reduce_mod
from fruitpipe.pipeline.failures import watch_interrupts
from fruitpipe.pipeline.frames import file_tasks
from fruitpipe.pipeline.manifest import Inputs
from fruitpipe.schemas import REJECTS_SCHEMA
from fruitpipe.spark import JobProgress, default_parallelism, save_ml_model, spark_session

log = logging.getLogger(__name__)


class LazySpark:
    """Starts Spark on first use only (a caller's session is used as is), so `reduce` on an up-to-date output never
    pays the JVM start."""

    def __init__(self, config: Config, stack: contextlib.ExitStack, session: Any = None) -> None:
        self._config = config
        self._stack = stack
        self.session: Any = session  # the caller's (a notebook's): used as is, never stopped
        self.start_seconds = 0.0

    def get(self) -> Any:
        if self.session is None:
            t0 = time.perf_counter()
            self.session = self._stack.enter_context(
                spark_session(self._config.master, "fruitpipe", self._config.task_cpus, self._config.spark_conf)
            )
            self.start_seconds = time.perf_counter() - t0
            watch_interrupts()  # SparkContext replaced the handler: watch again, chaining to its own
        return self.session


_NO_INFERENCE = {"tasks": 0, "workers": 0, "sessions_built": 0, "max_sessions_per_worker": 0,
                 "threads_per_task": 0}


def _inference_stats(summary: pa.Table) -> dict[str, int]:
    """run.json's inference section from the embed tasks' summary rows (one per task)."""
    if summary.num_rows == 0:
        return dict(_NO_INFERENCE)
    per_pid: dict[int, int] = {}
    for pid, built in zip(summary.column("pid").to_pylist(), summary.column("sessions_built").to_pylist()):
        per_pid[pid] = max(per_pid.get(pid, 0), built)
    return {
        "tasks": summary.num_rows,
        "workers": len(per_pid),
        "sessions_built": sum(per_pid.values()),
        "max_sessions_per_worker": max(per_pid.values()),
        "threads_per_task": max(summary.column("threads").to_pylist()),
    }


#: Spark job group of the accounting, which runs in a thread of its own (pipeline/run.py cancels it on errors).
ACCOUNTING_GROUP = "fruitpipe-accounting"


@dataclass
class EmbedOutcome:
    """What the embed stage did (run.json's counts of this run; a dry run's plan) and the accounting of the
    committed rows, left for the caller to run (a few Spark jobs, ~2.5 s on the sample) while the PCA is fitted:
    it returns the rest of the counts and deletes the run's staging after."""

    counts: dict[str, Any]
    account: Callable[[], dict[str, Any]]


def embed_stage(config: Config, model: ResolvedModel, spark: LazySpark, rundir: RunDir, token: str,
                timings: dict[str, float], inputs: Inputs, resources: dict[str, Any],
                dry_run: bool = False) -> EmbedOutcome:
    """Drop rows that are no longer valid, embed the listed inputs no committed row covers, deduplicate, commit;
    adds bytes read and the stage's peak memory to `resources`. The manifest, the committed rows and the run's
    index are compared on the executors (bookkeeping.py). A dry run stops after the plan and writes nothing."""
    session = spark.get()  # JVM start is timed apart from the stage
    t0 = time.perf_counter()
    staging = None if dry_run else rundir.staging(token)
    manifest, listed = inputs.frame(session, staging)
    plan = bookkeeping.plan(session, rundir, manifest, listed - inputs.name_rejects.num_rows, inputs.name_rejects,
                            rundir.settings(), config.max_pixels, staging)
    pending = plan.todo_rows + plan.name_rejects.num_rows
    log.info("%d listed, %d already done, %d to embed", listed, listed - pending, plan.todo_rows)
    timings["plan"] = time.perf_counter() - t0
    if dry_run:
        tasks = task_count(plan.todo_rows, config.partition_size, default_parallelism(session))
        return EmbedOutcome(
            {"listed": listed, **inputs.ignored(), "already_done": listed - pending, "to_embed": plan.todo_rows,
             "to_reject_by_listing": plan.name_rejects.num_rows, "to_drop_before_embedding": plan.by_reason,
             "tasks": tasks,
             "committed": bookkeeping.accounting(session, rundir, manifest, inputs.name_rejects, listed)},
            dict)
    assert staging is not None
    dropped = rundir.drop_rows(plan.drops, token)
    if dropped:
        log.info("dropped %d row(s) no longer valid: %s", dropped, plan.by_reason)

    inference = dict(_NO_INFERENCE)
    embedded_now = rejected_now = 0
    if plan.name_rejects.num_rows:
        storage.write_parquet(plan.name_rejects, storage.join(staging, "rejects", "part-names.parquet"))
        rejected_now += plan.name_rejects.num_rows
    if plan.todo_rows:
        t1 = time.perf_counter()
        # Pixel scaling inside the graph: tasks feed the decoded uint8 pixels, no float32 copy (models/wrap.py).
        wrapped = wrap_uint8(model.read_bytes(), model.spec)
        settings = embed_mod.EmbedSettings(
            model_sha256=wrapped.sha256, input_size=model.spec.input_size, input_name=wrapped.input_name,
            output_name=model.spec.output_name, dim=model.spec.dim, batch_size=config.batch_size,
            preprocess=model.spec.preprocess, layout=model.spec.layout, uint8_input=True,
            max_pixels=config.max_pixels, staging_uri=staging, storage=storage.current(), device=config.device,
            # Local reads take microseconds: the pool only paid off on S3 (local sweep: no gain, within noise).
            read_ahead=config.read_ahead if config.input_list or storage.is_s3(config.input) else 1,
        )
        earlier_jobs = group_jobs(session, embed_mod.JOB_GROUP)  # a shared session's earlier runs
        summary = embed_mod.run_embed_job(session, plan.todo, plan.todo_rows, settings, wrapped.data,
                                          config.partition_size, config.quiet)
        timings["embed_job"] = time.perf_counter() - t1
        resources["bytes_read"] = int(pc.sum(summary.column("bytes_read")).as_py() or 0)
        resources["peak_memory_bytes"]["embed"] = stage_peaks(session, embed_mod.JOB_GROUP, earlier_jobs)
        inference = _inference_stats(summary)
        embedded_now = int(pc.sum(summary.column("embedded")).as_py() or 0)
        rejected_now += int(pc.sum(summary.column("rejected")).as_py() or 0)
        dups = bookkeeping.duplicates(session, embed_mod.index_frame(session, settings), plan.kept, plan.todo)
        if dups.num_rows:
            embedded_now -= dups.num_rows
            rejected_now += dups.num_rows
            log.info("%d duplicate input(s) (same bytes as another): recorded in rejects", dups.num_rows)
            by_part: dict[str, list[str]] = {}
            for uri, part in zip(dups.column("uri").to_pylist(), dups.column("part").to_pylist()):
                by_part.setdefault(storage.join(staging, "embeddings", part), []).append(uri)
            embed_mod.drop_rows_from_parts(session, by_part)
            dup_rejects = pa.table(
                {
                    "id": dups.column("id"), "uri": dups.column("uri"), "label": dups.column("label"),
                    "split": dups.column("split"), "reason": pa.array(["duplicate"] * dups.num_rows),
                    "detail": pc.binary_join_element_wise("same bytes as ", dups.column("kept"), ""),
                    "size": dups.column("size"), "mtime_ns": dups.column("mtime_ns"),
                },
                schema=REJECTS_SCHEMA,
            )
            storage.write_parquet(dup_rejects, storage.join(staging, "rejects", "part-duplicates.parquet"))
    # Publish: the staged parts are moved in, then named in the commit record in one write.
    rundir.commit_parts(staging, token, settings={"max_pixels": config.max_pixels})
    rundir.ensure_datasets(token)  # readers always find both datasets with their schema
    timings["embed"] = time.perf_counter() - t0

    def account() -> dict[str, Any]:
        t1 = time.perf_counter()
        session.sparkContext.setJobGroup(ACCOUNTING_GROUP, "accounting")  # this thread's jobs, to cancel them
        counts = bookkeeping.accounting(session, rundir, manifest, inputs.name_rejects, listed)
        storage.delete(staging)  # after the accounting, which reads the staged manifest
        timings["accounting"] = time.perf_counter() - t1
        return counts

    return EmbedOutcome(
        {**inputs.ignored(), "embedded_this_run": embedded_now, "rejected_this_run": rejected_now,
         "skipped_already_done": listed - pending, "dropped_before_embedding": plan.by_reason,
         "inference": inference},
        account)


def reduce_stage(config: Config, model: ResolvedModel, spark: LazySpark, rundir: RunDir, token: str,
                 timings: dict[str, float], digest: Callable[[], str], resources: dict[str, Any],
                 basis: pca_files.Basis | None = None) -> dict[str, Any]:
    """Fit PCA on every committed embedding, commit pca/ and reduced/; skipped when the commit record says the
    committed PCA was fitted on exactly these embeddings with these settings. `digest()` gives the embeddings'
    ids_digest; it is asked for only when a PCA entry exists and at the commit, so the accounting that computes it
    runs while the PCA is fitted (every change to the embeddings clears the entry). `basis`: --pca-from's, read and
    checked by the caller before the output was touched."""
    t0 = time.perf_counter()

    def fingerprint() -> dict[str, Any]:
        if basis is not None:  # the basis decides k; no refit while these embeddings and that basis stay the same
            return {"embedding_ids_digest": digest(), "pca_from": basis.fingerprint}
        return {"embedding_ids_digest": digest(), "k": config.k, "variance": config.variance}

    entry = rundir.reduce_entry()
    if entry is not None and entry.get("fingerprint") == fingerprint():
        try:
            report = json.loads(storage.read_bytes(rundir.join("pca", "explained_variance.json")))
            summary = _pca_summary(report)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("pca/explained_variance.json is unreadable (%s): fitting the PCA again", exc)
        else:
            log.info("PCA and reduced vectors are up to date; nothing to reduce")
            timings["reduce"] = time.perf_counter() - t0
            return {**summary, "skipped": True}
    files = rundir.files("embeddings")
    session = spark.get()
    earlier_jobs = group_jobs(session, reduce_mod.JOB_GROUP)  # a shared session's earlier runs
    session.sparkContext.setJobGroup(reduce_mod.JOB_GROUP, "reduce")  # the fit's jobs too (JobProgress clears it)
    staging = rundir.staging(token, "reduce")  # the accounting still running deletes the embed stage's
    # Two passes over the part files, each task reading one part straight from storage: the fit's Gramian, then
    # the projection, which also measures the variance along the components (the fit's check, or the shares of a
    # --pca-from basis on these embeddings). Nothing is published before both agree.
    pool = concurrent.futures.ThreadPoolExecutor(1)  # the driver's own work, done while the executors work
    try:
        pool.submit(pca_files.load_plotting)  # matplotlib's import (unless done), while the Gramian is summed
        fit: reduce_mod.PcaFit | None = None
        if basis is None:
            t1 = time.perf_counter()
            fit = reduce_mod.fit_pca(session, files, model.spec.dim, rundir.uri)
            timings["reduce_fit"] = time.perf_counter() - t1
            k = reduce_mod.choose_k(fit.explained, config.k, config.variance)
            kept = fit.components[:, :k]
            probe = fit.components[:, :reduce_mod.CHECKED_COMPONENTS]
            # The fitted basis's files (the Spark ML model, the scree plot) are written while the executors
            # project; they are published only once the check passed.
            artifacts = pool.submit(_write_fit_artifacts, session, fit, k, config.variance, fingerprint,
                                    storage.join(staging, "pca"))
        else:
            kept, k = basis.components, int(basis.components.shape[1])
            probe = kept
            log.info("projecting with the PCA of %s (k=%d, basis %s...): no refit", basis.source, k,
                     basis.fingerprint[:12])
        t1 = time.perf_counter()
        # The bar counts images when the fit knows them, part files otherwise (a --pca-from projection).
        total, unit = (fit.n_samples, "img") if fit else (len(files), "part")
        with JobProgress(session, reduce_mod.JOB_GROUP, total=total, unit=unit, desc="reduce", quiet=config.quiet,
                         tasks=file_tasks(session, len(files))):
            rows, measured = reduce_mod.project_parts(session, files, probe, kept,
                                                      storage.join(staging, "reduced"))
        timings["reduce_project"] = time.perf_counter() - t1
        if fit is not None:
            if fit.n_samples != rows:
                raise reduce_mod.PcaCheckError(
                    f"the PCA read {fit.n_samples} rows and the projection {rows}: the embeddings changed during "
                    "the run; nothing was published: re-run the same command")
            reduce_mod.check_pca(measured, fit.explained)
            report = artifacts.result()
        else:
            assert basis is not None
            report = pca_files.write_basis_artifacts(storage.join(staging, "pca"), basis, rows, measured,
                                                     fingerprint())
            shares = np.asarray(basis.report.get("per_component") or measured)
            save_ml_model(session, reduce_mod.spark_pca_model(session, kept, shares),
                          storage.join(staging, "pca", reduce_mod.SPARK_MODEL_DIR))
        timings["reduce_artifacts"] = time.perf_counter() - t1 - timings["reduce_project"]
    except BaseException:
        # The files' thread may be waiting for the accounting's digest: stop the accounting's jobs first, so that
        # an error or Ctrl-C here does not wait for all of them.
        session.sparkContext.cancelJobGroup(ACCOUNTING_GROUP)
        raise
    finally:
        pool.shutdown()
        resources["peak_memory_bytes"]["reduce"] = stage_peaks(session, reduce_mod.JOB_GROUP, earlier_jobs)
    rundir.commit_reduce(staging, fingerprint(), token)
    storage.delete(staging)
    timings["reduce"] = time.perf_counter() - t0
    log.info("PCA: k=%d explains %.1f %% of the variance", k, 100 * float(report["explained_at_k"]))
    return {**_pca_summary(report), "skipped": False}


def _write_fit_artifacts(session: Any, fit: reduce_mod.PcaFit, k: int, variance: float | None,
                         fingerprint: Callable[[], dict[str, Any]], pca_uri: str) -> dict[str, Any]:
    """pca/ of a fitted PCA (explained_variance.json, scree.png, components.npy) and, so that Spark users lose
    nothing, the same basis as a PCAModel that PCAModel.load reads back; returns the report. The fingerprint is
    asked for last: it waits for the accounting."""
    save_ml_model(session, reduce_mod.spark_pca_model(session, fit.components[:, :k], fit.explained),
                  storage.join(pca_uri, reduce_mod.SPARK_MODEL_DIR))
    return pca_files.write_pca_artifacts(pca_uri, fit, k, variance, fingerprint())


def _pca_summary(report: dict[str, Any]) -> dict[str, Any]:
    cumulative = report["cumulative"]
    summary = {
        "k": report["k"],
        "selected_by": report["selected_by"],
        "explained_at_k": report["explained_at_k"],
        "cumulative_at": {str(n): cumulative[n - 1] for n in (6, 20, 50, 100) if n <= len(cumulative)},
        "n_samples": report["n_samples"],
        # Which basis the reduced vectors are in: fitted here, or another output's (--pca-from), by fingerprint.
        "basis": report.get("basis"),
    }
    if "measured_on_this_output" in report:
        summary["explained_at_k_on_this_output"] = report["measured_on_this_output"]["explained_at_k"]
    return summary


