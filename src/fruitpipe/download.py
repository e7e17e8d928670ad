"""Pinned public downloads (model weights, sample photos): parallel, retried with back-off, sha256-verified, resumable;
a file lands under its final name only once its bytes are checked."""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import logging
import os
import random
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fruitpipe.errors import FruitpipeError
from fruitpipe.logs import json_mode

log = logging.getLogger(__name__)

#: The public host every pinned file is fetched from (GitHub's raw-file host; each URL names a commit, never a
#: branch). FRUITPIPE_DOWNLOAD_BASE replaces it (a mirror, or the tests' loopback server); the paths stay the same.
PUBLIC_HOST = "https://raw.githubusercontent.com"
BASE_ENV = "FRUITPIPE_DOWNLOAD_BASE"

#: Status codes worth another try: rate limiting (GitHub's raw host answers 429) and transient server errors.
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_CHUNK = 1 << 16


class DownloadError(FruitpipeError):
    """A pinned file could not be fetched or failed its check; nothing was kept under its name."""


@dataclass(frozen=True)
class PinnedFile:
    """One file to fetch: its path on the host (and below the destination folder), size and sha256."""

    host_path: str
    dest: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Retry:
    """How hard to try: attempts per file, the first back-off (doubled each time, with jitter) and its ceiling,
    the seconds one read may wait, and the slowest average rate an attempt may keep."""

    attempts: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 60.0
    timeout_s: float = 30.0
    #: Bytes per second: an attempt must end within timeout_s + size / min_rate (30 s + 7 min for the 14 MB weights
    #: at 32 KiB/s), however its bytes arrive: a mirror dripping one byte every 2 s kept the read timeout from ever
    #: firing, and the build at 0 % for as long as it dripped.
    min_rate: float = 32 * 1024

    def deadline_s(self, size: int) -> float:
        """Seconds one attempt at a file of `size` bytes may take."""
        return self.timeout_s + size / self.min_rate


class _Live:
    """The connections of a fetch_all, so that a stop (Ctrl-C, SIGTERM, a failed file) ends their reads at once
    instead of when each next times out: a worker thread blocked in a read would otherwise hold the exit."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.responses: set[Any] = set()
        self.stopped = threading.Event()

    def add(self, resp: Any) -> None:
        with self.lock:
            if self.stopped.is_set():
                raise _Stopped
            self.responses.add(resp)

    def discard(self, resp: Any) -> None:
        with self.lock:
            self.responses.discard(resp)

    def stop(self) -> None:
        with self.lock:
            self.stopped.set()
            for resp in self.responses:
                sock = getattr(getattr(getattr(resp, "fp", None), "raw", None), "_sock", None)
                try:
                    if sock is not None:
                        sock.shutdown(socket.SHUT_RDWR)  # wakes a read blocked in another thread
                except OSError:
                    pass


class _Stopped(Exception):
    """The fetch was stopped (another file failed, or the command was interrupted)."""


def base_url() -> str:
    """FRUITPIPE_DOWNLOAD_BASE (without a trailing slash), else the public host."""
    return (os.environ.get(BASE_ENV) or PUBLIC_HOST).rstrip("/")


def url_of(host_path: str, base: str | None = None) -> str:
    """The full URL of `host_path` (quoted: Fruits-360 class folders hold spaces)."""
    return (base or base_url()) + "/" + urllib.parse.quote(host_path.lstrip("/"))


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_done(path: Path, pinned: PinnedFile) -> bool:
    """True when `path` already holds the pinned bytes (size first: cheap; then sha256)."""
    try:
        if path.stat().st_size != pinned.size:
            return False
    except OSError:
        return False
    return sha256_file(path) == pinned.sha256


class _Transient(Exception):
    """A failure another attempt may fix; `wait_s` is the server's Retry-After, when it sent one."""

    def __init__(self, why: str, wait_s: float | None = None) -> None:
        super().__init__(why)
        self.wait_s = wait_s


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _fetch_once(url: str, pinned: PinnedFile, dest: Path, retry: Retry, live: _Live | None = None) -> None:
    """One attempt: stream to a hidden temporary file beside `dest`, check size and sha256, rename; within
    retry.deadline_s(size), checked after every read (each returns what has arrived, never waits for a full chunk)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A leading dot: a folder reader (fruitpipe's listing, pyarrow, Spark) never takes a partial file for an input.
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    h = hashlib.sha256()
    got = 0
    deadline = time.monotonic() + retry.deadline_s(pinned.size)
    resp: Any = None
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                resp = urllib.request.urlopen(url, timeout=retry.timeout_s)  # noqa: S310 (pinned URL)
                if live is not None:
                    live.add(resp)
                length = resp.headers.get("Content-Length")
                if length is not None and length.isdigit() and int(length) != pinned.size:
                    raise DownloadError(f"{url} is {int(length)} bytes, pinned {pinned.size}: refused, nothing "
                                        "kept (a truncated or replaced file, or a wrong mirror)")
                for chunk in iter(lambda: resp.read1(_CHUNK), b""):
                    if live is not None and live.stopped.is_set():
                        raise _Stopped
                    got += len(chunk)
                    if got > pinned.size:
                        raise DownloadError(f"{url} is larger than the pinned {pinned.size} bytes: refused "
                                            "(a wrong mirror? check FRUITPIPE_DOWNLOAD_BASE)")
                    h.update(chunk)
                    out.write(chunk)
                    if time.monotonic() > deadline and got < pinned.size:
                        raise _Transient(f"{got} of {pinned.size} bytes after {retry.deadline_s(pinned.size):.0f} "
                                         f"s: slower than {retry.min_rate / 1024:.0f} KiB/s")
            except urllib.error.HTTPError as exc:
                if exc.code in RETRY_STATUS:
                    raise _Transient(f"HTTP {exc.code}", _retry_after(exc.headers.get("Retry-After"))) from None
                raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                if live is not None and live.stopped.is_set():
                    raise _Stopped from None  # the stop ended its read
                raise _Transient(str(getattr(exc, "reason", exc)) or type(exc).__name__) from None
            finally:
                if resp is not None:
                    if live is not None:
                        live.discard(resp)
                    resp.close()
        if got < pinned.size:
            raise _Transient(f"connection closed after {got} of {pinned.size} bytes")
        if h.hexdigest() != pinned.sha256:
            raise DownloadError(f"{url} has sha256 {h.hexdigest()[:16]}..., pinned {pinned.sha256[:16]}...: "
                                "refused, nothing kept (a corrupt file or a wrong mirror)")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fetch(pinned: PinnedFile, dest: Path, base: str, retry: Retry, stop: threading.Event | _Live | None = None) -> int:
    """Fetch one pinned file into `dest` with retries and exponential back-off; returns the bytes fetched (0 when
    stopped: `stop`, an event or the connections of a fetch_all whose stop also ends the reads in flight)."""
    url = url_of(pinned.host_path, base)
    live = stop if isinstance(stop, _Live) else None
    event = stop.stopped if isinstance(stop, _Live) else stop
    for attempt in range(1, retry.attempts + 1):
        if event is not None and event.is_set():
            return 0
        try:
            _fetch_once(url, pinned, dest, retry, live)
            return pinned.size
        except _Stopped:
            return 0
        except _Transient as exc:
            if attempt == retry.attempts:
                raise DownloadError(f"{url}: {exc} after {attempt} attempts; try again later (downloads resume "
                                    f"where they stopped), or set {BASE_ENV} to a mirror") from None
            # The server's Retry-After when it sent one (it knows when its rate limit resets), else exponential
            # back-off with jitter, so that parallel workers do not retry in lockstep.
            if exc.wait_s is not None:
                delay = min(exc.wait_s, retry.max_backoff_s)
            else:
                delay = min(retry.max_backoff_s, retry.backoff_s * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
            log.debug("%s: %s (attempt %d of %d), retrying in %.1f s", url, exc, attempt, retry.attempts, delay)
            if event is not None:
                event.wait(delay)
            else:
                time.sleep(delay)
    return 0  # pragma: no cover (the loop returns or raises)


@dataclass(frozen=True)
class FetchReport:
    """What a fetch_all call did: files already there, files fetched and their bytes."""

    kept: int
    fetched: int
    bytes: int


def fetch_all(files: Iterable[PinnedFile], folder: Path, *, workers: int = 8, retry: Retry | None = None,
              desc: str = "download", quiet: bool = False) -> FetchReport:
    """Fetch every pinned file missing from `folder` (resuming: a file already there with the pinned sha256 is kept),
    `workers` at a time; the first file that cannot be had stops the rest and raises DownloadError."""
    from tqdm import tqdm

    retry = retry or Retry()
    base = base_url()
    todo: list[PinnedFile] = []
    kept = 0
    files = list(files)
    for pinned in files:
        if is_done(folder / pinned.dest, pinned):
            kept += 1
        else:
            todo.append(pinned)
    if not todo:
        return FetchReport(kept, 0, 0)
    total = sum(p.size for p in todo)
    log.info("%s: %d file(s), %.1f MB from %s (%d already here)", desc, len(todo), total / 1e6, base, kept)
    live = _Live()
    fetched = 0
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=quiet or json_mode(), leave=False) as bar, \
            ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="fruitpipe-download") as pool:
        futures = [pool.submit(fetch, p, folder / p.dest, base, retry, live) for p in todo]
        try:
            for future in as_completed(futures):
                n = future.result()
                fetched += 1
                bar.update(n)
        except BaseException:  # a file that cannot be had, Ctrl-C, SIGTERM: the reads in flight end now
            live.stop()
            for f in futures:
                f.cancel()
            raise
    return FetchReport(kept, fetched, total)
