"""A started EMR cluster: its state and steps, the logs EMR pushed to S3, waiting for its step, termination, and
the signal handling that makes sure a cluster `run` started is terminated."""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import logging
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from fruitpipe.cloud.settings import EmrError, split_s3

log = logging.getLogger(__name__)


_STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _handling(signals: tuple[signal.Signals, ...], handler: Any) -> Iterator[None]:
    """Within the block, `signals` go to `handler`; their previous handlers come back after it (main thread only:
    elsewhere Python cannot set handlers, and the block runs unchanged)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in signals}
    for sig in signals:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise KeyboardInterrupt as Ctrl-C does (main thread only)."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    with _handling((signal.SIGTERM, signal.SIGHUP), interrupt):
        yield


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Within the block, Ctrl-C, SIGTERM and SIGHUP are recorded, not acted on; the first is raised as
    KeyboardInterrupt when the block ends (main thread only): a call that starts a billing cluster returns its id
    before the interruption, so that the id is known and the cluster terminated."""
    got: list[int] = []
    with _handling(_STOPS, lambda signum, frame: got.append(signum)):
        yield
    if got:
        raise KeyboardInterrupt(signal.Signals(got[0]).name)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """Within the block, Ctrl-C, SIGTERM and SIGHUP are ignored (main thread only): a second Ctrl-C must not cut
    the termination of a billing cluster short."""
    with _handling(_STOPS, signal.SIG_IGN):
        yield


def _iso(when: Any) -> str:
    """A timeline datetime as ISO 8601 in UTC (JSON-printable), or ''."""
    return when.astimezone(dt.UTC).isoformat() if isinstance(when, dt.datetime) else ""


def _when_logs_come(st: dict[str, Any]) -> str:
    """When EMR will have pushed this cluster's logs, from its state and timeline."""
    now = dt.datetime.now(dt.UTC)
    by = (now + dt.timedelta(minutes=5)).strftime("%H:%M UTC")
    if st["state"] not in CLUSTER_DONE:
        return (f"the cluster is {st['state']}; EMR copies node, bootstrap and step logs to S3 every 5 minutes once "
                f"the nodes are up: try again after {by}")
    ended = dt.datetime.fromisoformat(st["ended_at"]) if st.get("ended_at") else None
    if ended is not None and now - ended < dt.timedelta(minutes=10):
        return (f"the cluster ended at {ended.strftime('%H:%M UTC')}; EMR pushes the last logs as the nodes shut "
                f"down: try again after {by}")
    return ("the cluster ended over 10 minutes ago and pushed none: its nodes may have failed before logging "
            "started (the cluster's reason in `fruitpipe emr status` says why), or the instance role cannot write "
            "to the log prefix (s3:PutObject)")


STEP_DONE = {"COMPLETED", "CANCELLED", "FAILED", "INTERRUPTED"}
CLUSTER_DONE = {"TERMINATED", "TERMINATED_WITH_ERRORS"}


class ClusterWatch:
    """The cluster half of the EMR client: needs `region`, `emr` and `s3` from its subclass."""

    region: str
    emr: Any
    s3: Any

    def read(self, uri: str) -> bytes | None:
        """An object's bytes, or None if it does not exist."""
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri, "URI")
        try:
            return self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise

    def status(self, cluster_id: str) -> dict[str, Any]:
        """Cluster state, its reason, and each step's state, oldest first, with EMR's failure reason, message and
        log file when it failed."""
        from botocore.exceptions import ClientError

        try:
            c = self.emr.describe_cluster(ClusterId=cluster_id)["Cluster"]
        except ClientError as exc:
            raise EmrError(f"cluster {cluster_id} not found in {self.region} ({exc.response['Error']['Code']}): "
                           "check the id and --region") from None
        steps = self.emr.list_steps(ClusterId=cluster_id)["Steps"]
        return {
            "cluster_id": cluster_id, "name": c.get("Name"), "state": c["Status"]["State"],
            "reason": c["Status"].get("StateChangeReason", {}).get("Message") or "",
            "reason_code": c["Status"].get("StateChangeReason", {}).get("Code") or "",
            "log_uri": c.get("LogUri", ""), "ended_at": _iso(c["Status"].get("Timeline", {}).get("EndDateTime")),
            "normalized_instance_hours": c.get("NormalizedInstanceHours", 0),
            # ListSteps answers newest first: listed oldest first here, so that steps[-1] is the latest.
            "steps": [{"id": s["Id"], "name": s["Name"], "state": s["Status"]["State"],
                       "reason": s["Status"].get("FailureDetails", {}).get("Reason", ""),
                       "message": s["Status"].get("FailureDetails", {}).get("Message", ""),
                       "log_file": s["Status"].get("FailureDetails", {}).get("LogFile", "")}
                      for s in reversed(steps)],
        }

    def logs(self, cluster_id: str, step_id: str | None = None, tail: int = 200) -> dict[str, str]:
        """What EMR pushed to the log URI for this cluster: bootstrap-action logs of every node, the step's
        controller/stderr/stdout, and the stderr of each YARN container (executor tracebacks), as
        {path under the cluster's folder: text}, each cut to its last `tail` lines (0: whole). When there is
        nothing yet, the error says when EMR will push them (every 5 minutes, and once more at termination)."""
        st = self.status(cluster_id)
        if not st["log_uri"]:
            raise EmrError(f"cluster {cluster_id} has no log URI: it was not started by fruitpipe")
        step_id = step_id or (st["steps"][-1]["id"] if st["steps"] else None)
        base = re.sub(r"^s3n://", "s3://", st["log_uri"]).rstrip("/")
        bucket, prefix = split_s3(f"{base}/{cluster_id}", "--logs")
        wanted = [re.compile(r"node/[^/]+/bootstrap-actions/\d+/(stderr|stdout|controller)\.gz"),
                  re.compile(rf"steps/{re.escape(step_id or '-')}/(controller|stderr|stdout)\.gz"),
                  re.compile(r"containers/[^/]+/[^/]+/stderr\.gz")]
        keys: list[tuple[int, str]] = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix) + 1:]
                rank = next((i for i, pattern in enumerate(wanted) if pattern.fullmatch(rel)), None)
                if rank is not None:
                    keys.append((rank, rel))
        found: dict[str, str] = {}
        for _, rel in sorted(keys):
            data = self.read(f"s3://{bucket}/{prefix}/{rel}")
            if data is None:
                continue
            lines = gzip.decompress(data).decode("utf-8", "replace").splitlines()
            cut = lines[-tail:] if tail and len(lines) > tail else lines
            head = [f"[... {len(lines) - len(cut)} earlier lines; --tail 0 shows all]"] if len(cut) < len(lines) else []
            found[rel.removesuffix(".gz")] = "\n".join(head + cut)
        if not found:
            raise EmrError(f"no logs yet under {base}/{cluster_id}/: {_when_logs_come(st)}")
        return found

    def down(self, cluster_id: str) -> str:
        """Terminate the cluster; returns its state after the request."""
        self.emr.terminate_job_flows(JobFlowIds=[cluster_id])
        return self.status(cluster_id)["state"]

    def wait(self, cluster_id: str, timeout_s: float, poll_s: float = 30.0,
             report: Callable[[str], None] | None = None, terminate_on_timeout: bool = False) -> dict[str, Any]:
        """Poll until the step ends or the cluster terminates; reports each state change with elapsed time."""
        start = time.monotonic()
        last = ""
        while True:
            st = self.status(cluster_id)
            step = st["steps"][-1] if st["steps"] else {"state": "NONE"}
            now = f"cluster {st['state']}, step {step['state']}"
            if st["state"] in CLUSTER_DONE and (st["reason_code"] or st["reason"]):
                now += f" ({' '.join(x for x in (st['reason_code'], st['reason']) if x)})"  # why it ended
            if now != last and report is not None:
                elapsed = time.monotonic() - start
                report(f"[{int(elapsed // 60):3d}m{int(elapsed % 60):02d}s] {now}")
            last = now
            if step["state"] in STEP_DONE or st["state"] in CLUSTER_DONE:
                return st
            if time.monotonic() - start > timeout_s:
                if terminate_on_timeout:
                    self.down(cluster_id)
                    raise EmrError(f"cluster {cluster_id} still {now} after {timeout_s:.0f} s: it was terminated; "
                                   "raise --timeout and run again (committed work is kept)")
                raise EmrError(f"cluster {cluster_id} still {now} after {timeout_s:.0f} s; it keeps running: "
                               f"watch it with `fruitpipe emr status {cluster_id}`, stop it with "
                               f"`fruitpipe emr down {cluster_id}`")
            time.sleep(poll_s)
