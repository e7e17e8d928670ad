"""One run: the order of stages (check, list, claim under a lease, embed what is new, reduce, publish)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy
import PIL
import pyarrow as pa

from fruitpipe import images, lease, storage
from fruitpipe.config import Config
from fruitpipe.errors import ConfigError, OutputError
from fruitpipe.logs import new_run_id, run_scope
from fruitpipe.models import get_spec, resolve_model
from fruitpipe.models.custom import resolve_custom, spec_of, spec_record
from fruitpipe.models.fetch import ResolvedModel
from fruitpipe.models.quantize import Int8Model, prepare_int8_model
from fruitpipe.models.registry import CUSTOM
from fruitpipe.models.runner import check_model
from fruitpipe.monitor.resources import driver_peak_rss
from fruitpipe.output import RunDir
from fruitpipe.pipeline import manifest, pca_files, uptodate
from fruitpipe.pipeline.bookkeeping import committed_ids_digest
from fruitpipe.pipeline.failures import interrupt_flag, job_failures
from fruitpipe.pipeline.listing import Listing, check_input, list_images
from fruitpipe.pipeline.stages import ACCOUNTING_GROUP, LazySpark, embed_stage, reduce_stage
from fruitpipe.report import write_report
from fruitpipe.storage import StorageOptions
from fruitpipe.version import __version__, code_sha256

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a run did: the content of run.json."""

    output: str
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, Any]:
        """The counts section of run.json."""
        return self.report["counts"]


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
    if config.input_list:  # INPUT is a list of images, not a folder of them
        fingerprint["input_list"] = True
    if model.spec.name == CUSTOM:  # how to feed it and read it, for every later command on this output
        fingerprint["model_spec"] = spec_record(model.spec)
    return fingerprint


def _versions(spark: Any) -> dict[str, str]:
    import onnxruntime
    import pyspark

    versions = {
        "fruitpipe": __version__,
        "fruitpipe_code_sha256": code_sha256(),  # the EMR code artifacts' key (cloud/artifacts.py)
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


@contextlib.contextmanager
def _run_context(config: Config, session: Any = None) -> Iterator[LazySpark]:
    """The run's Spark (started on first use) inside its storage context: every storage call reaches the object
    store with config's endpoint and region."""
    with contextlib.ExitStack() as stack, storage.configured(StorageOptions(config.s3_endpoint, config.region)):
        yield LazySpark(config, stack, session)


@contextlib.contextmanager
def _background(spark: LazySpark) -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    """A thread for the work that overlaps a stage (the embed stage's accounting); on an error or Ctrl-C its Spark
    jobs are cancelled before it is waited for, so stopping does not wait for them."""
    with concurrent.futures.ThreadPoolExecutor(1, "fruitpipe-background") as pool:
        try:
            yield pool
        except BaseException:
            if spark.session is not None:
                spark.session.sparkContext.cancelJobGroup(ACCOUNTING_GROUP)
            raise


def _refuse_if_nothing_read(rundir: RunDir, counts: dict[str, Any]) -> None:
    """A run in which no listed input could be embedded is a failure, never a complete output: one line naming
    the commonest reason and a URI that has it (the rejects stay committed, so the re-run after a fix redoes only
    them)."""
    if counts.get("embedded") or not counts.get("listed"):
        return
    by_reason = counts.get("rejects_by_reason") or {}
    reason = max(by_reason, key=lambda r: by_reason[r]) if by_reason else "unknown"
    example = ""
    for uri in rundir.files("rejects"):
        t = storage.read_parquet(uri, columns=["uri", "reason"])
        hits = [u for u, r in zip(t.column("uri").to_pylist(), t.column("reason").to_pylist()) if r == reason]
        if hits:
            example = f", e.g. {min(hits)}"
            break
    raise OutputError(f"none of the {counts['listed']} listed input(s) could be embedded: {by_reason.get(reason, 0)} "
                      f"{reason}{example} (all reasons: {json.dumps(by_reason)}); check the input and its access "
                      "rights, then re-run")


def run(config: Config, stages: tuple[str, ...] = ("embed", "reduce"), listing: Listing | None = None,
        session: Any = None, dry_run: bool = False) -> RunResult:
    """Run the given stages on `config`, commit the outputs and return what run.json records.

    `listing` replaces the listing of config.input (a manifest made elsewhere, e.g. from a catalogue).
    `session` is an existing SparkSession to use (a notebook's); the run never stops it.
    `dry_run`: list, compare with OUTPUT and return the plan (report["plan"]) without writing anything.
    """
    config.validate()
    started = time.time()
    t_total = time.perf_counter()
    out = storage.normalize(config.output)
    token = new_run_id(started)
    timings: dict[str, float] = {}
    resources: dict[str, Any] = {"bytes_read": 0, "peak_memory_bytes": {}}
    int8: Int8Model | None = None
    run_key: str | None = None  # set when this run can be told up to date next time (pipeline.uptodate)
    with run_scope(token), interrupt_flag(), _run_context(config, session) as spark, \
            job_failures(out), _background(spark) as background:
        rundir = RunDir(out)
        if "embed" in stages:
            # Everything that can refuse is checked before the output is touched: a bad INPUT, OUTPUT or model
            # leaves it as it was.
            rundir.check_separate_from(config.input)
            if config.input_list:
                manifest.check(manifest.list_files(config.input))
            elif listing is None:
                check_input(config.input)
            if config.is_custom:  # any ONNX image model: its spec from the file and the flags, checked on load
                model = resolve_custom(config.model_path, config.input_size, config.preprocess, config.layout,
                                       config.output_name)
                if config.variance is None and config.k > model.spec.dim:
                    raise ConfigError(f"--k {config.k} exceeds the embedding size {model.spec.dim} of "
                                      f"{config.model_path}: use a smaller --k")
                config = config.replace(model=CUSTOM)
            else:
                model = resolve_model(get_spec(config.model), config.model_path, quiet=config.quiet)
                check_model(model)
            fingerprint = _fingerprint(config, model)
            # Refused before the lease is taken, so a refused command writes nothing there; claimed under it below.
            rundir.check_claimable(fingerprint, config.overwrite, _FINGERPRINT_DEFAULTS)
            if listing is None and not config.input_list:
                t0 = time.perf_counter()
                listing = list_images(config.input, config.list_threads)
                timings["list"] = time.perf_counter() - t0
            if listing is not None and not (dry_run or config.overwrite or config.pca_from
                                            or config.precision != "fp32"):
                run_key = uptodate.run_key(fingerprint, stages, config.k, config.variance, config.max_pixels,
                                           uptodate.listing_digest(listing.manifest, listing.rejected))
                previous = uptodate.previous_if_unchanged(rundir, run_key)
                if previous is not None:  # nothing changed: no Spark; only run.json says this run happened
                    log.info("%s is up to date: the same %d inputs (uri, size, mtime) and settings as run %s; "
                             "nothing to do (listing %.1f s)", out, listing.count, previous.get("run_id"),
                             timings["list"] if "list" in timings else 0.0)
                    timings["total"] = time.perf_counter() - t_total
                    unchanged = uptodate.unchanged_report(previous, token, started, timings)
                    with lease.hold(out, token) as held:
                        held.check()
                        rundir.publish(unchanged, True)
                    return RunResult(output=out, report=unchanged)
            inputs = manifest.Inputs(listing=listing) if not config.input_list else manifest.Inputs(
                list_uri=config.input)
            if dry_run:
                plan = embed_stage(config, model, spark, rundir, token, timings, inputs, resources,
                                   dry_run=True).counts
                timings["total"] = time.perf_counter() - t_total
                return RunResult(output=out, report={"dry_run": True, "plan": plan, "counts": {},
                                                     "timings_s": {k: round(v, 3) for k, v in timings.items()},
                                                     "peak_memory_bytes": {"driver": driver_peak_rss()}})
            if config.precision == "int8":  # calibrated on the input's Training images, checked on this CPU
                t0 = time.perf_counter()
                sample = inputs.sample(spark.get(), 2_000)
                int8 = prepare_int8_model(model, sample, out, config.max_pixels)
                model = int8.model
                timings["int8_model"] = time.perf_counter() - t0
        else:
            fingerprint = read_marker(out)
            # Reducing needs only the embedding size: the model file itself is not fetched.
            model = ResolvedModel(spec_of(fingerprint), "", fingerprint["model_sha256"], "output")
            config = config.replace(input=fingerprint["input"], model=fingerprint["model"],
                                    input_list=bool(fingerprint.get("input_list")))
        # Another output's basis is read and checked before the output is touched: a typo leaves _SUCCESS in place.
        basis = pca_files.load_basis(config.pca_from, model.sha256, model.spec.dim) \
            if config.pca_from and "reduce" in stages else None
        with lease.hold(out, token) as held:
            rundir.guard = held.check  # every commit-record write first checks the lease is still ours
            rundir.under_lease = held.publish  # ...in the same transaction as the write
            if "embed" in stages:
                rundir.claim(fingerprint, config.overwrite, _FINGERPRINT_DEFAULTS)
                if int8 is not None:
                    int8.store(out)
            # From here until _SUCCESS is written again, readers know the output is being changed.
            rundir.begin(token)
            previous = rundir.previous_report() if "embed" not in stages else {}
            if not config.master.startswith("local") and not storage.is_s3(out):
                log.warning("OUTPUT %s is a local path: with --master %s every node must see it (shared folder)",
                            out, config.master)
            accounting: concurrent.futures.Future[dict[str, Any]] | None = None
            if "embed" in stages:
                if "reduce" in stages:
                    # The scree plot's matplotlib import while the embed job leaves the driver idle (0.3 s): during
                    # the reduce stage it took 0.8-1.1 s and held the GIL while the Gramian's results came in.
                    background.submit(pca_files.load_plotting)
                outcome = embed_stage(config, model, spark, rundir, token, timings, inputs, resources)
                counts = outcome.counts
                # The accounting's jobs run while the PCA is fitted; the reduce stage waits for its digest only
                # to commit, and _SUCCESS for its verdict.
                accounting = background.submit(outcome.account)
                if counts["embedded_this_run"] == 0:  # nothing new: is there anything at all?
                    _refuse_if_nothing_read(rundir, accounting.result())
            else:
                counts = dict(previous.get("counts") or {})
                entry = rundir.reduce_entry()
                # Every change to the embeddings clears the record's PCA entry, so while it is there its digest is
                # that of the committed embeddings: an up-to-date output is checked without starting Spark.
                counts["embedding_ids_digest"] = entry["fingerprint"]["embedding_ids_digest"] \
                    if entry and "embedding_ids_digest" in (entry.get("fingerprint") or {}) \
                    else committed_ids_digest(spark.get(), rundir)
                if "accounted" not in counts:
                    raise OutputError(f"{out} has no run.json from an embed stage: run `fruitpipe embed` first")
            held.check()

            def digest() -> str:
                return (accounting.result() if accounting else counts)["embedding_ids_digest"]

            pca = reduce_stage(config, model, spark, rundir, token, timings, digest, resources, basis) \
                if "reduce" in stages else (previous.get("pca") if rundir.reduce_entry() else None)
            if accounting is not None:
                counts = {**accounting.result(), **counts}
            timings["spark_start"] = spark.start_seconds
            timings["total"] = time.perf_counter() - t_total
            report: dict[str, Any] = {
                "fruitpipe_version": __version__,
                "run_id": token,
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                "stages": list(stages),
                "config": {**config.to_dict(), "input": fingerprint["input"], "output": out},
                "model": {"name": model.spec.name, "sha256": model.sha256, "source": model.source,
                          "precision": fingerprint.get("precision", _FINGERPRINT_DEFAULTS["precision"]),
                          "file": model.spec.filename, "dim": model.spec.dim, "input_size": model.spec.input_size,
                          "preprocess": model.spec.preprocess, "layout": model.spec.layout,
                          "crop": images.DEFAULT_CROP,
                          **({"spec": spec_record(model.spec)} if model.spec.name == CUSTOM else {})},
                "versions": _versions(spark.session),
                "commit": {"version": rundir.record()["version"]},
                "counts": counts,
                "pca": pca,
                "timings_s": {k: round(v, 3) for k, v in timings.items()},
                "resources": {**resources, "peak_memory_bytes": {**resources["peak_memory_bytes"],
                                                                 "driver": driver_peak_rss()}},
            }
            if int8 is not None:
                report["model"]["int8"] = {k: int8.meta[k] for k in ("scheme", "agreement", "cpu") if k in int8.meta}
                if "last_check" in int8.meta:
                    report["model"]["int8"]["this_run"] = int8.meta["last_check"]
            embedded_now = counts.get("embedded_this_run", 0)
            if timings.get("embed") and embedded_now:
                report["throughput_img_s"] = {"embed": round((embedded_now + counts.get("rejected_this_run", 0))
                                                             / timings["embed"], 1)}
            uptodate.stamp(report, rundir, run_key)
            held.check()
            rundir.publish(report, bool(counts.get("accounted")),
                           f"the accounting failed: {counts.get('listed')} listed, {counts.get('embedded')} "
                           f"embedded + {counts.get('rejected')} rejected")
            write_report(rundir)
    return RunResult(output=out, report=report)


def read_marker(out: str) -> dict[str, Any]:
    """The fingerprint (input, model, sha256) of the run that owns `out`; OutputError if there is none."""
    marker = RunDir(out).read_marker()
    if marker is None:
        raise OutputError(f"{out} holds no fruitpipe embeddings: run `fruitpipe embed INPUT {out}` first")
    for key in ("input", "model", "model_sha256"):
        if not isinstance(marker.get(key), str):
            raise OutputError(f"{out}/_fruitpipe.json is corrupt (no {key}): re-run `fruitpipe embed` with "
                              "--overwrite")
    return marker
