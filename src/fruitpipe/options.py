"""Command options declared once, on the fields of a command's settings dataclass: the default, the help and how
the flag's text becomes a value; the command line is generated from them (cli_args.add_fields, from_args)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from typing import Any

from fruitpipe.images import DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class Flag:
    """How one settings field appears on the command line. `help` may say %(default)s: argparse fills it from the
    field's default, so a default is written once. Without `type`, the default's type decides: a bool is a switch,
    a tuple a repeatable flag, an int a whole number, a float a finite number, else the text itself."""

    help: str
    flag: str | None = None  # default: --the-field-name
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    #: The flag switches off a setting that is on by default (--no-pca-table for compare_pca).
    negate: bool = False
    #: The field holds the flag's value times this (--decode-mb N for a field in bytes: 1024 * 1024).
    unit: int = 1
    positional: bool = False
    #: The name a TOML table and a FRUITPIPE_* variable use (default: the flag's own, e.g. --output -> output).
    key: str | None = None
    #: Flags of one settings class shared by several commands: which of them has this one (`run`'s Config: embed,
    #: reduce; cli_args.add_fields(sections=...)). None: every command of the class.
    section: str | None = None
    #: Flags with the same name here are mutually exclusive (--k and --variance).
    exclusive: str | None = None


def option(default: Any = MISSING, *, help: str, **how: Any) -> Any:
    """A settings field with its flag (see Flag); no default: a positional argument or a required setting."""
    return field(default=default, metadata={"flag": Flag(help, **how)})


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


def max_pixels_option() -> Any:
    """--max-pixels of the commands that decode uploaded or labelled photos (serve, evaluate), declared once."""
    return option(DEFAULT_MAX_PIXELS, type=in_range(1),
                  help="largest decoded image (default %(default)s; decompression-bomb guard)")


def threads_option() -> Any:
    """--threads of the commands that run the classifier in onnxruntime (serve, evaluate), declared once."""
    return option(0, type=in_range(0), help="onnxruntime threads (default: its own)")


def classifier_output_option() -> Any:
    """OUTPUT of the commands that read its trained classifier (serve, evaluate), declared once."""
    return option(positional=True, metavar="OUTPUT", help="an OUTPUT with a classifier (`fruitpipe train OUTPUT`)")
