"""How to reach object stores: the options, and the storage context that carries them to every storage call of a
command (storage.py and s3_objects.py both read it), on the ground floor."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

#: The one default region of every command (GDPR: the data stays in the EU): S3 for `run`, `train`, `serve`..., and
#: the cluster for `emr`.
DEFAULT_REGION = "eu-west-3"


@dataclass(frozen=True)
class StorageOptions:
    """How to reach object stores; small and picklable so Spark tasks rebuild the same filesystem."""

    s3_endpoint: str | None = None
    region: str = DEFAULT_REGION


# One process runs one command, and a command reaches one object store: its options are set once, where the
# command starts (and at the start of each Spark task: `carried`, and embed's partitions from their settings), and
# every storage call below reads them here, instead of receiving them through each function on the way. A plain
# module global, not a ContextVar: the storage calls made in thread pools (listing, read-ahead, moves) see it too.
_current = StorageOptions()


def current() -> StorageOptions:
    """The options of the command running in this process (the AWS defaults until one is configured)."""
    return _current


@contextlib.contextmanager
def configured(opts: StorageOptions) -> Iterator[StorageOptions]:
    """Every storage call inside the block, in any thread of this process, reaches object stores with `opts`; the
    previous options come back after it."""
    global _current
    before, _current = _current, opts
    try:
        yield opts
    finally:
        _current = before


def configure(opts: StorageOptions) -> None:
    """Set the options for the rest of this process: what a Spark task does first, with the driver's options."""
    global _current
    _current = opts


def carried(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn` as a Spark task runs it: this process's options are shipped with it and set in the worker first (a
    worker process serves one task at a time, of this command or a later one)."""
    opts = _current

    def in_task(*args: Any, **kwargs: Any) -> T:
        configure(opts)
        return fn(*args, **kwargs)

    return in_task
