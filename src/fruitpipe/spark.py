"""Spark session helper (reuse the active one, stop only what it started) and a driver-side progress bar."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from fruitpipe import storage
from fruitpipe.errors import ConfigError, OutputError
from fruitpipe.logs import current_run_id, json_mode
from fruitpipe.monitor.resources import SPARK_CONF

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

#: A mapInArrow function: Arrow batches of one partition in, Arrow batches out.
ArrowFn = Callable[[Iterator["pa.RecordBatch"]], Iterator["pa.RecordBatch"]]


def _log4j_options() -> str:
    """JVM options for the packaged log4j2 config that keeps Spark's own logs at WARN from the first line; with
    --log-format json, merged with the one whose lines are JSON objects carrying this run's id."""
    files = ["log4j2.properties", "log4j2-json.properties"] if json_mode() else ["log4j2.properties"]
    paths = ",".join(f"file:{resources.files('fruitpipe').joinpath(f)}" for f in files)
    run_id = f" -Dfruitpipe.run_id={current_run_id()}" if json_mode() else ""
    return f"-Dlog4j2.configurationFile={paths}{run_id}"


def _inherited_conf(key: str) -> str:
    """The value spark-submit already gives `key` (from spark-defaults.conf: on EMR, extraJavaOptions with its
    OutOfMemory and GC flags), so that fruitpipe appends to it instead of replacing it; '' outside spark-submit,
    where the JVM has not started yet and nothing was inherited."""
    if not os.environ.get("PYSPARK_GATEWAY_PORT"):
        return ""
    from pyspark import SparkConf, SparkContext

    SparkContext._ensure_initialized()  # connects to spark-submit's JVM; starts nothing
    return SparkConf().get(key, "") or ""


@contextlib.contextmanager
def spark_session(
    master: str = "local[*]",
    app_name: str = "fruitpipe",
    task_cpus: int = 1,
    conf: Mapping[str, str] | None = None,
) -> Iterator[pyspark.sql.SparkSession]:  # type: ignore[name-defined]  # noqa: F821
    """Yield the active SparkSession if there is one, else start one and stop it on exit."""
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is None and SparkContext._active_spark_context is not None:
        # Started elsewhere, e.g. in another thread (the active session is per thread): reuse it, never stop it.
        active = SparkSession.builder.getOrCreate()
    if active is not None:
        yield active
        return
    # Executors must run this interpreter: otherwise they start the system Python, which lacks our packages.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    if master.startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    ours = _log4j_options()
    java_opts = {key: f"{_inherited_conf(key)} {ours}".strip()
                 for key in ("spark.driver.extraJavaOptions", "spark.executor.extraJavaOptions")}
    builder = (
        SparkSession.builder.master(master)
        .appName(app_name)
        .config("spark.task.cpus", str(task_cpus))
        .config("spark.python.worker.reuse", "true")  # one Python worker (and one ONNX session) per slot
        .config("spark.ui.showConsoleProgress", "false")  # our own bar on the driver instead
        .config("spark.driver.extraJavaOptions", java_opts["spark.driver.extraJavaOptions"])
        .config("spark.executor.extraJavaOptions", java_opts["spark.executor.extraJavaOptions"])
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.shuffle.partitions", "8")
    )
    for key, value in {**SPARK_CONF, **(conf or {})}.items():  # executor peak memory in run.json
        if key in java_opts:
            value = f"{java_opts[key]} {value}"  # the cluster's and our options stay, the user's come last
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    try:
        if master.startswith("yarn"):
            check_yarn(spark)
        yield spark
    except BaseException:
        # The run has failed or the user pressed Ctrl-C: the exception is what the CLI reports, in one line. What the
        # JVM prints from here on is the teardown of the failed job's other tasks, killed while the context stops.
        _quiet_jvm(spark)
        _drain(spark)
        raise
    finally:
        spark.stop()


def _quiet_jvm(spark: Any) -> None:
    """Silence our own JVM (its log level OFF, System.err at nothing) once a run has failed. A failed job ends before
    its other tasks are killed; stopping the context under them printed, after the CLI's one-line error, whatever
    their teardown hit: an INTERNAL_ERROR from a block lock released after the block manager's clear(), a
    RejectedExecutionException after Ctrl-C (both seen in CI, under load). What is logged before Python receives the
    failure is log4j2.properties' business. The failure itself is already in the Python exception (in full with
    --verbose); the executors of a cluster log to their own files, untouched."""
    try:
        sc = spark.sparkContext
        sc.setLogLevel("OFF")
        jvm = sc._jvm
        jvm.java.lang.System.setErr(jvm.java.io.PrintStream(jvm.java.io.OutputStream.nullOutputStream()))
    except Exception as exc:  # the JVM may already be going away
        log.debug("could not quiet the JVM: %s", exc)


def _drain(spark: Any, timeout_s: float = 30.0) -> None:
    """Before stopping a context that an error or Ctrl-C left with running jobs: cancel them and wait until they
    have ended, so that stop() does not shut Spark's thread pools under callbacks still on their way (the JVM then
    printed a RejectedExecutionException trace after the CLI's one-line message)."""
    try:
        sc = spark.sparkContext
        sc.cancelAllJobs()
        deadline = time.monotonic() + timeout_s
        while sc.statusTracker().getActiveJobsIds() and time.monotonic() < deadline:
            time.sleep(0.1)  # polling Spark's own job state, not a timed fault
    except Exception as exc:  # the JVM may already be going away; stop() follows regardless
        log.debug("could not drain the Spark jobs before stopping: %s", exc)


def save_ml_model(spark: Any, model: Any, dest: str) -> None:
    """Save a Spark ML model (readable by its class's load()) under `dest`, on every master the same way. Spark's ML
    writer runs on the executors through Hadoop's filesystem, so it writes a temporary folder on the cluster's own
    default filesystem (this machine's disk in local mode, HDFS on EMR); the driver reads its few files back
    through Hadoop and publishes them with storage.write_bytes, the path every other output file takes (pyarrow.fs:
    on s3:// the IAM-tested one). Hadoop never sees `dest`: no EMRFS, whose probes fall outside the instance role's
    prefix-scoped ListBucket, and no S3 connector."""
    sc = spark.sparkContext
    jvm = sc._jvm
    local_dir = tempfile.mkdtemp(prefix="fruitpipe-model-") if sc.master.startswith("local") else None
    where = f"{Path(local_dir).as_uri()}/m" if local_dir else f"/tmp/fruitpipe-model-{uuid.uuid4().hex}/m"
    path = jvm.org.apache.hadoop.fs.Path(where)
    fs = path.getFileSystem(sc._jsc.hadoopConfiguration())
    try:
        model.write().overwrite().save(where)
        base = fs.makeQualified(path).toUri().getPath().rstrip("/")
        files, published = fs.listFiles(path, True), []
        while files.hasNext():
            status = files.next()
            rel = status.getPath().toUri().getPath()[len(base) + 1:]
            name = rel.rsplit("/", 1)[-1]
            if name.endswith(".crc") or name == "_SUCCESS":  # load() needs neither
                continue
            stream = fs.open(status.getPath())
            try:
                data = bytes(jvm.org.apache.commons.io.IOUtils.toByteArray(stream))
            finally:
                stream.close()
            storage.write_bytes(storage.join(dest, rel), data)
            published.append(rel)
        if not any(rel.startswith("metadata/") for rel in published):
            raise OutputError(f"the Spark ML model written to {fs.makeQualified(path).toString()} cannot be read back "
                              "by the driver: on a cluster whose default filesystem is each node's own disk, set "
                              "spark.hadoop.fs.defaultFS to one they share (HDFS)")
    finally:
        try:
            fs.delete(path.getParent(), True)
        finally:
            if local_dir:
                shutil.rmtree(local_dir, ignore_errors=True)


#: Set by `fruitpipe emr` on the step: the YARN memory per core node its executors were sized for.
YARN_MB_CONF = "spark.fruitpipe.yarnMbPerNode"


def yarn_verdict(node_mb: list[int], expected_mb: int | None, dynamic: str, executors: str) -> str:
    """The step log's line on YARN (NodeManagers' memory, dynamic allocation, executors asked for); a
    ConfigError when a node has less memory than the plan sized the executors for (YARN would never grant them:
    the step would wait until its timeout, billing)."""
    line = (f"YARN: {len(node_mb)} NodeManager(s), memory {', '.join(f'{mb} MB' for mb in node_mb) or 'none yet'}; "
            f"dynamic allocation {'on' if dynamic.lower() == 'true' else 'off'}; executors asked for: {executors}")
    short = [mb for mb in node_mb if expected_mb is not None and mb < expected_mb]
    if short:
        raise ConfigError(f"{line}; the plan sized the executors for {expected_mb} MB per node and YARN gives "
                          f"{min(short)} MB: they would never be granted. Stopped before any work: check --core-type "
                          "against the nodes (yarn.nodemanager.resource.memory-mb) and plan again")
    return line


def check_yarn(spark: Any) -> None:
    """On YARN: log the NodeManagers' memory, whether dynamic allocation is on and the executors asked for, and
    refuse to go on when a node has less memory than `emr plan` assumed (YARN_MB_CONF). The nodes are read through
    Hadoop's YarnClient on the driver; when they cannot be, say so and go on."""
    sc = spark.sparkContext
    conf = sc.getConf()
    expected = conf.get(YARN_MB_CONF, None)
    try:
        jvm = sc._jvm
        client = jvm.org.apache.hadoop.yarn.client.api.YarnClient.createYarnClient()
        client.init(sc._jsc.hadoopConfiguration())
        client.start()
        try:
            node_state = jvm.org.apache.hadoop.yarn.api.records.NodeState
            states = sc._gateway.new_array(node_state, 1)
            states[0] = node_state.RUNNING
            node_mb = sorted(int(r.getCapability().getMemorySize()) for r in client.getNodeReports(states))
        finally:
            client.stop()
    except Exception as exc:  # py4j, no YARN client on the classpath, the RM unreachable: not a reason to stop
        log.warning("YARN's NodeManagers could not be read (%s): executor sizing not checked",
                    str(exc).splitlines()[0][:160])
        return
    log.info("%s", yarn_verdict(node_mb, int(expected) if expected else None,
                                conf.get("spark.dynamicAllocation.enabled", "false"),
                                conf.get("spark.executor.instances", "Spark's default")))


def default_parallelism(spark: pyspark.sql.SparkSession) -> int:  # type: ignore[name-defined]  # noqa: F821
    """Task slots of the cluster: cores / spark.task.cpus (at least 1)."""
    sc = spark.sparkContext
    cpus = int(sc.getConf().get("spark.task.cpus", "1"))
    return max(1, sc.defaultParallelism // cpus)


def from_arrow(spark: pyspark.sql.SparkSession, table: pa.Table) -> pyspark.sql.DataFrame:  # type: ignore[name-defined]  # noqa: F821
    """A DataFrame from an Arrow table, straight to the JVM on Spark 4; through pandas (still Arrow-based) on
    Spark 3.5, which EMR 7 ships and whose createDataFrame takes no Arrow table."""
    if int(spark.version.split(".")[0]) >= 4:
        return spark.createDataFrame(table)
    from pyspark.sql.pandas.types import from_arrow_schema

    # With its schema: Spark 3.5 cannot infer one from an empty frame (CANNOT_INFER_EMPTY_SCHEMA).
    return spark.createDataFrame(table.to_pandas(), schema=from_arrow_schema(table.schema))


def to_arrow(df: pyspark.sql.DataFrame) -> pa.Table:  # type: ignore[name-defined]  # noqa: F821
    """Collect a DataFrame as an Arrow table: DataFrame.toArrow on Spark 4, its Arrow batches on Spark 3.5."""
    if hasattr(df, "toArrow"):
        return df.toArrow()
    from pyspark.sql.pandas.types import to_arrow_schema

    batches = df._collect_as_arrow()  # Spark 3.5: the same Arrow collection that toPandas uses
    return pa.Table.from_batches(batches, schema=batches[0].schema if batches else to_arrow_schema(df.schema))


class JobProgress:
    """Progress bar on the driver for the Spark jobs of one job group: done/total items and items/s.

    Tasks finish at their own pace; items done are estimated as completed tasks x items per task.
    """

    def __init__(self, spark: object, group: str, total: int, unit: str = "img", desc: str = "",
                 quiet: bool = False, interval: float = 0.5, tasks: int | None = None) -> None:
        self._sc = spark.sparkContext  # type: ignore[attr-defined]
        self._tasks = tasks
        self._group = group
        self._total = total
        self._unit = unit
        self._desc = desc
        self._quiet = quiet
        self._interval = interval
        self._stop = threading.Event()
        self._failed = False
        self._thread: threading.Thread | None = None

    def _fraction(self) -> float:
        """Completed share of the tasks of the stage doing the work: the last stage with `tasks` tasks (when
        given), else each job's last stage. A preceding stage, such as the shuffle that spreads the manifest
        (a job of its own under adaptive execution), finishes in a second and must not move the bar."""
        tracker = self._sc.statusTracker()
        done = total = 0
        for job_id in tracker.getJobIdsForGroup(self._group):
            job = tracker.getJobInfo(job_id)
            if job is None:
                continue
            stages = [tracker.getStageInfo(s) for s in sorted(job.stageIds, reverse=True)]
            stages = [s for s in stages if s is not None and (self._tasks is None or s.numTasks == self._tasks)]
            if stages:
                done += stages[0].numCompletedTasks
                total += stages[0].numTasks
        if self._tasks is not None:
            return min(1.0, done / self._tasks)
        return done / total if total else 0.0

    def _loop(self) -> None:
        from tqdm import tqdm

        # No bar in json mode: a log collector reads stderr line by line, and a bar is not a JSON line.
        with tqdm(total=self._total, unit=self._unit, desc=self._desc, disable=self._quiet or json_mode(),
                  file=sys.stderr, dynamic_ncols=True) as bar:
            while not self._stop.wait(self._interval):
                bar.update(max(0, int(self._fraction() * self._total) - bar.n))
            if self._failed:
                bar.set_postfix_str("failed")  # the bar stays where the work stopped, never a false 100 %
            else:
                bar.update(max(0, int(self._fraction() * self._total) - bar.n))

    def __enter__(self) -> JobProgress:
        self._sc.setJobGroup(self._group, self._desc or self._group)
        if self._total > 0:
            self._thread = threading.Thread(target=self._loop, name="fruitpipe-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._failed = exc[0] is not None
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._sc.setLocalProperty("spark.jobGroup.id", None)
