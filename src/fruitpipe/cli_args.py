"""Shared by the command-line modules: argument types, the one-line-error parser, KEY=VALUE flags, S3 options."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from fruitpipe.errors import FruitpipeError
from fruitpipe.storage_options import DEFAULT_REGION

EPILOG = (
    "Paths are local folders or s3://bucket/prefix URIs. Settings merge as --config TOML < FRUITPIPE_* "
    "environment variables < flags. Model files: --model-path FILE, or FRUITPIPE_MODELS=DIR, or a verified "
    "download into FRUITPIPE_CACHE (default ~/.cache/fruitpipe/models)."
)


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (with the fix) and exit code 2, never a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def whole_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    return value


def in_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number from `low` to `high` (no upper bound when None), else a one-line error."""
    def check(text: str) -> int:
        value = whole_number(text)
        if value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"{low} or more"
            raise argparse.ArgumentTypeError(f"{text!r} is out of range: give a whole number {bound}")
        return value
    return check


def share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number such as 0.95") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number: give one such as 0.95")
    return value


def positive_float(text: str) -> float:
    value = share(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
    return value


def key_values(items: Sequence[str], flag: str, example: str) -> dict[str, str]:
    """{KEY: VALUE} from repeated KEY=VALUE flags; a malformed one is a one-line error naming `flag`."""
    found: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FruitpipeError(f"{flag} {item!r} must look like KEY=VALUE, e.g. {flag} {example}")
        found[key] = value
    return found


def add_storage(p: argparse.ArgumentParser) -> None:
    """The object-store options every command that reads or writes s3:// has, declared once."""
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (default: AWS; env AWS_ENDPOINT_URL)")
    p.add_argument("--region", help=f"AWS region for s3:// URIs (default {DEFAULT_REGION}; env AWS_REGION)")


def add_verbosity(p: argparse.ArgumentParser, quiet: str = "warnings only", quiet_default: bool | None = False) -> None:
    """--quiet (what it silences, said per command) and --verbose, declared once."""
    p.add_argument("--quiet", "-q", action="store_true", default=quiet_default, help=quiet)
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")


def storage_options(args: argparse.Namespace) -> Any:
    """StorageOptions from --s3-endpoint / --region, else AWS_ENDPOINT_URL / AWS_REGION, else AWS in DEFAULT_REGION."""
    from fruitpipe.storage import StorageOptions

    return StorageOptions(args.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL"),
                          args.region or os.environ.get("AWS_REGION") or DEFAULT_REGION)


def add_metrics(p: argparse.ArgumentParser) -> None:
    """--metrics-file and --pushgateway: the command's Prometheus metrics (monitor/metrics.py)."""
    p.add_argument("--metrics-file", metavar="PATH",
                   help="write the command's metrics in Prometheus text format (node-exporter textfile collector)")
    p.add_argument("--pushgateway", metavar="URL",
                   help="push the command's metrics to a Prometheus Pushgateway (job fruitpipe), e.g. "
                        "http://pushgateway:9091")


def add_log_format(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """--log-format on every command and sub-command of `parser` (one place, so none is forgotten)."""
    from fruitpipe.logs import FORMATS

    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    # Before or after the command: the top level holds the default, a command's flag only overrides it.
    parser.add_argument("--log-format", choices=FORMATS, default="text" if top else argparse.SUPPRESS,
                        help="text (default, for people) or json (one object per line with the run id)")
    for action in subparsers:
        for sub in set(action.choices.values()):
            add_log_format(sub, top=False)


def export_metrics(args: argparse.Namespace, command: str, started: float, report: Any, output: str) -> None:
    """Export the command's metrics where --metrics-file / --pushgateway ask; a report of None = it failed."""
    if not (getattr(args, "metrics_file", None) or getattr(args, "pushgateway", None)):
        return
    from fruitpipe.monitor.metrics import command_metrics, export

    registry = command_metrics(command, report is not None, started, report)
    export(registry, args.metrics_file, args.pushgateway, command, output)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM handled as Ctrl-C for the block (a KeyboardInterrupt, so the command cleans up and exits 130, as
    `run` does); the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

