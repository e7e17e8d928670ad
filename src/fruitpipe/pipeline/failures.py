"""How a run fails: storage and Spark errors as one line (JobFailedError), Ctrl-C and SIGTERM as interruptions."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

from fruitpipe.errors import FruitpipeError

_INTERRUPTED = threading.Event()


class JobFailedError(FruitpipeError):
    """A Spark job or a storage call failed (storage unreachable, executors lost beyond retries); nothing was
    published as complete."""


def _failure_summary(exc: BaseException) -> str:
    """The root cause of a failure in one line (the last Python or Java error line of its text)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    causes = [line for line in lines if ("Error:" in line or "Exception:" in line) and "Traceback" not in line]
    return (causes[-1] if causes else (lines[0] if lines else type(exc).__name__))[:300]


@contextlib.contextmanager
def job_failures(out: str) -> Iterator[None]:
    """Turn a failed Spark job into a one-line FruitpipeError that says how to resume."""
    try:
        yield
    except FruitpipeError:
        raise
    except Exception as exc:
        if _INTERRUPTED.is_set():
            raise KeyboardInterrupt from None  # whatever a Ctrl-C broke (a py4j call, a job) is the interruption
        _raise_job_failure(out, exc)


def _raise_job_failure(out: str, exc: Exception) -> None:
    """Raise the one-line JobFailedError for a storage or Spark failure; re-raise anything else unchanged."""
    from py4j.protocol import Py4JError
    from pyspark.errors import PySparkException

    resume = (f"nothing was published as complete (no {out}/_SUCCESS): fix the cause and re-run the same command, "
              "committed work is kept")
    if isinstance(exc, OSError):  # storage unreachable or refusing, on the driver (listing, commit, run.json)
        raise JobFailedError(f"storage error: {_failure_summary(exc)}; {resume}") from exc
    if not isinstance(exc, (Py4JError, PySparkException)):
        raise exc
    if "cancellation of all jobs" in str(exc):
        raise KeyboardInterrupt from None  # Ctrl-C cancelled the jobs: an interruption, not a failure
    raise JobFailedError(f"a Spark job failed: {_failure_summary(exc)}; {resume}") from exc


def watch_interrupts() -> None:
    """Install a SIGINT/SIGTERM handler that sets _INTERRUPTED, then does what the current handler did (PySpark's
    own cancels the running jobs); called again once Spark has started, since SparkContext installs its own."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        prev = signal.getsignal(sig)

        def handler(signum: int, frame: Any, prev: Any = prev) -> None:
            _INTERRUPTED.set()
            if callable(prev):
                prev(signum, frame)
            raise KeyboardInterrupt

        signal.signal(sig, handler)


@contextlib.contextmanager
def interrupt_flag() -> Iterator[None]:
    """Remember a Ctrl-C (SIGINT) or SIGTERM for the whole run: PySpark's handler cancels the running jobs, which
    then surface as a 'job cancelled' or py4j error; with the flag set they are reported as the interruption."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _INTERRUPTED.clear()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    watch_interrupts()
    try:
        yield
    finally:
        for sig, prev in previous.items():
            signal.signal(sig, prev)
