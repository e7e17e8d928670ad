"""Typed exceptions whose messages tell the user what to do; the CLI prints them as one line, exit 2."""

from __future__ import annotations

import errno


class FruitpipeError(Exception):
    """Base class of every error fruitpipe reports to a user instead of a traceback."""


class ConfigError(FruitpipeError):
    """A bad argument or setting; the message says how to fix it."""


class ModelError(FruitpipeError):
    """A model file could not be found, downloaded or verified."""


class OutputError(FruitpipeError):
    """The output location is unusable or belongs to another configuration."""


def disk_full(exc: BaseException) -> bool:
    """An OSError that says the disk (or quota) is full: Python's errno, or pyarrow's message, which has none."""
    return isinstance(exc, OSError) and (exc.errno in (errno.ENOSPC, errno.EDQUOT)
                                         or "No space left on device" in str(exc)
                                         or "Disk quota exceeded" in str(exc))
