"""What a run consumed: peak memory per stage from Spark's executor metrics, the driver's own peak, bytes read."""

from __future__ import annotations

import logging
import resource
import sys
from typing import Any

log = logging.getLogger(__name__)

#: Spark executor metrics kept in run.json (bytes): the JVM heap, the executor JVM's resident set and its Python
#: workers' (process-tree metrics, Linux /proc; spark_session turns them on).
EXECUTOR_METRICS = {"jvm_heap": "JVMHeapMemory", "jvm_rss": "ProcessTreeJVMRSSMemory",
                    "python_rss": "ProcessTreePythonRSSMemory"}
#: Settings that make Spark record those peaks, per stage: the process tree is read every 250 ms. A task reports
#: the peaks polled while it ran, so with 1 s the sub-second embed tasks of a small run (their inputs now read from
#: staged Parquet by warm workers) reported none.
SPARK_CONF = {"spark.executor.processTreeMetrics.enabled": "true",
              "spark.executor.metrics.pollingInterval": "250ms"}


def driver_peak_rss() -> int:
    """This process's peak resident set in bytes: VmHWM on Linux, else ru_maxrss (bytes on macOS). Linux carries
    ru_maxrss over exec, so a driver started by a large parent process reported the parent's peak (seen: 822 MB for
    a 200 MB driver launched by a benchmark holding a 2,000,000-entry list); VmHWM belongs to this process alone."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def group_jobs(spark: Any, group: str) -> frozenset[int]:
    """The ids of the jobs Spark has run so far in job group `group`: what stage_peaks must skip, since a shared
    session (a notebook's) keeps every earlier run's jobs in the group."""
    try:
        return frozenset(spark.sparkContext.statusTracker().getJobIdsForGroup(group))
    except Exception as exc:
        log.debug("Spark's job ids could not be read: %s", exc)
        return frozenset()


def stage_peaks(spark: Any, group: str, before: frozenset[int] = frozenset()) -> dict[str, int]:
    """The highest value of each EXECUTOR_METRICS over every executor and every stage of the jobs of job group
    `group` but those in `before` (group_jobs at the stage's start), in bytes; metrics Spark did not record (another
    OS, polling off) are left out. {} when Spark's status store cannot be read (it is a JVM internal: a Spark without
    it is logged, never fatal)."""
    peaks: dict[str, int] = {}
    try:
        sc = spark.sparkContext
        store = sc._jsc.sc().statusStore()
        tracker = sc.statusTracker()
        for job_id in tracker.getJobIdsForGroup(group):
            if job_id in before:
                continue
            job = tracker.getJobInfo(job_id)
            for stage_id in (job.stageIds if job is not None else []):
                try:
                    found = store.lastStageAttempt(stage_id).peakExecutorMetrics()
                except Exception:  # a stage skipped (its shuffle output reused) has no attempt
                    continue
                if not found.isDefined():
                    continue
                metrics = found.get()
                for key, name in EXECUTOR_METRICS.items():
                    value = int(metrics.getMetricValue(name))
                    if value > 0:
                        peaks[key] = max(peaks.get(key, 0), value)
    except Exception as exc:
        log.debug("Spark's executor metrics could not be read: %s", exc)
        return {}
    return peaks
