"""Shared by the command-line modules: the one-line-error parser, flags generated from settings dataclasses,
KEY=VALUE flags, the shared option groups (storage, verbosity, metrics, log format)."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import MISSING, fields
from typing import Any

from fruitpipe.errors import FruitpipeError
from fruitpipe.logs import FORMATS
from fruitpipe.monitor.metrics import command_metrics, export
from fruitpipe.options import Flag, share, whole_number
from fruitpipe.storage import StorageOptions
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


def _flagged(cls: type) -> Iterator[tuple[Any, Flag]]:
    for f in fields(cls):
        if "flag" in f.metadata:
            yield f, f.metadata["flag"]


def _dest(f: Any, flag: Flag) -> str:
    """The key a TOML table and a FRUITPIPE_* variable use: Flag.key, else the flag's own name, else the field's."""
    return flag.key or (flag.flag.lstrip("-").replace("-", "_") if flag.flag else f.name)


def add_fields(p: argparse.ArgumentParser, cls: type, sections: tuple[str, ...] | None = None,
               layered: bool = False) -> None:
    """The flags of `cls`'s fields declared with options.option(), in field order: the settings dataclass is the
    one place an option's name, default, type and help are written. `sections`: only the fields of these sections
    (and those of none). `layered`: every flag's parsed default is None, so that a value merged from TOML and the
    environment below the flags (config.load_config) is not hidden by the default; the help still shows it."""
    groups: dict[str, Any] = {}
    for f, flag in _flagged(cls):
        if sections is not None and flag.section is not None and flag.section not in sections:
            continue
        default = None if f.default is MISSING else f.default
        target: Any = p
        if flag.exclusive:
            if flag.exclusive not in groups:
                groups[flag.exclusive] = p.add_mutually_exclusive_group()
            target = groups[flag.exclusive]
        text = flag.help.replace("%(default)s", str(default)) if layered else flag.help
        name = flag.flag or "--" + f.name.replace("_", "-")
        if flag.positional:
            target.add_argument(f.name, metavar=flag.metavar, help=text)
        elif flag.negate or isinstance(default, bool):
            target.add_argument(name, dest=_dest(f, flag), action="store_true", help=text,
                                default=None if layered else False)
        else:
            kind: Any = flag.type or (whole_number if isinstance(default, int) else share
                                      if isinstance(default, float) else None)
            repeat = isinstance(default, tuple)
            shown = default // flag.unit if flag.unit != 1 and default is not None else default
            target.add_argument(name, dest=_dest(f, flag), type=kind, action="append" if repeat else "store",
                                default=None if layered else [] if repeat else shown, choices=flag.choices,
                                metavar=flag.metavar, help=text)


def from_args(cls: type, args: argparse.Namespace, **given: Any) -> Any:
    """`cls` from the parsed flags of add_fields, and `given` for the fields the command fills itself (storage,
    quiet, ...)."""
    values: dict[str, Any] = {}
    for f, flag in _flagged(cls):
        if f.name in given:
            continue
        value = getattr(args, _dest(f, flag))
        if flag.negate:
            value = not value
        elif isinstance(f.default, tuple):
            value = tuple(value)
        elif flag.unit != 1 and value is not None:
            value *= flag.unit
        values[f.name] = value
    return cls(**values, **given)


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
    return StorageOptions(getattr(args, "s3_endpoint", None) or os.environ.get("AWS_ENDPOINT_URL"),
                          getattr(args, "region", None) or os.environ.get("AWS_REGION") or DEFAULT_REGION)


def add_metrics(p: argparse.ArgumentParser) -> None:
    """--metrics-file and --pushgateway: the command's Prometheus metrics (monitor/metrics.py)."""
    p.add_argument("--metrics-file", metavar="PATH",
                   help="write the command's metrics in Prometheus text format (node-exporter textfile collector)")
    p.add_argument("--pushgateway", metavar="URL",
                   help="push the command's metrics to a Prometheus Pushgateway (job fruitpipe), e.g. "
                        "http://pushgateway:9091")


def add_log_format(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """--log-format on every command and sub-command of `parser` (one place, so none is forgotten)."""
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

