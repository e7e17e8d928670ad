"""Logging for every command: human-readable lines (default) or one JSON object per line, with the run id."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

#: The id of the run the current code works for: run.json's run_id inside a pipeline run, else the command's own.
RUN_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("fruitpipe_run_id", default=None)
FORMATS = ("text", "json")
_json_mode = False

#: LogRecord attributes that are not extra fields given by the caller.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def new_run_id(started: float | None = None) -> str:
    """A run id: UTC time of the start and 8 random hex digits (sorts by time, unique across hosts)."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(started)) + "-" + uuid.uuid4().hex[:8]


#: This process's id, for log lines outside any pipeline run (train, serve, emr, drift).
_PROCESS_RUN_ID = new_run_id()


def current_run_id() -> str:
    """The run id log lines carry now."""
    return RUN_ID.get() or _PROCESS_RUN_ID


@contextlib.contextmanager
def run_scope(run_id: str) -> Iterator[None]:
    """Log lines inside the block carry `run_id`."""
    token = RUN_ID.set(run_id)
    try:
        yield
    finally:
        RUN_ID.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601 UTC, ms), level, logger, message, run_id, exception and extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "run_id": current_run_id(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class _StderrHandler(logging.StreamHandler):
    """A stream handler on whatever sys.stderr is when a record is emitted (it may be replaced after setup)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_logging(quiet: bool = False, verbose: bool = False, fmt: str = "text") -> None:
    """Configure the root logger on stderr: `fmt` text (default) or json; quiet = warnings only, verbose = debug.

    In text mode, logging that the host application already configured (handlers on the root logger: a notebook,
    a test runner) is left as it is, as logging.basicConfig would; json mode always installs its formatter."""
    global _json_mode
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(handler)
    _json_mode = fmt == "json"
    if _json_mode or not root.handlers:
        handler = _StderrHandler()
        handler.setFormatter(JsonFormatter() if _json_mode else
                             logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    for noisy in ("py4j", "matplotlib"):
        # py4j logs the Java side of an interrupted or failed call as ERROR tracebacks; the CLI's one line says it.
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose else logging.CRITICAL)


def json_mode() -> bool:
    """True when setup_logging chose JSON lines."""
    return _json_mode


def error_line(text: str, level: int = logging.ERROR) -> None:
    """A command's one-line error or notice on stderr: as is in text mode, as one JSON log line in json mode, so
    a log collector never sees a line it cannot parse."""
    if _json_mode:
        logging.getLogger("fruitpipe").log(level, text)
    else:
        sys.stderr.write(text + "\n")
