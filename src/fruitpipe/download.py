"""Pinned public downloads (model weights, sample photos): parallel, retried with back-off, sha256-verified, resumable;
a file lands under its final name only once its bytes are checked."""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import logging
import os
import random
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

from fruitpipe.errors import FruitpipeError

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
    """How hard to try: attempts per file, the first back-off (doubled each time, with jitter) and its ceiling."""

    attempts: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 60.0
    timeout_s: float = 30.0


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


def _fetch_once(url: str, pinned: PinnedFile, dest: Path, timeout_s: float) -> None:
    """One attempt: stream to a hidden temporary file beside `dest`, check size and sha256, rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A leading dot: a folder reader (fruitpipe's listing, pyarrow, Spark) never takes a partial file for an input.
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    h = hashlib.sha256()
    got = 0
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (pinned URL)
                    length = resp.headers.get("Content-Length")
                    if length is not None and length.isdigit() and int(length) != pinned.size:
                        raise DownloadError(f"{url} is {int(length)} bytes, pinned {pinned.size}: refused, nothing "
                                            "kept (a truncated or replaced file, or a wrong mirror)")
                    for chunk in iter(lambda: resp.read(_CHUNK), b""):
                        got += len(chunk)
                        if got > pinned.size:
                            raise DownloadError(f"{url} is larger than the pinned {pinned.size} bytes: refused "
                                                "(a wrong mirror? check FRUITPIPE_DOWNLOAD_BASE)")
                        h.update(chunk)
                        out.write(chunk)
            except urllib.error.HTTPError as exc:
                if exc.code in RETRY_STATUS:
                    raise _Transient(f"HTTP {exc.code}", _retry_after(exc.headers.get("Retry-After"))) from None
                raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as exc:
                raise _Transient(str(getattr(exc, "reason", exc)) or type(exc).__name__) from None
        if got < pinned.size:
            raise _Transient(f"connection closed after {got} of {pinned.size} bytes")
        if h.hexdigest() != pinned.sha256:
            raise DownloadError(f"{url} has sha256 {h.hexdigest()[:16]}..., pinned {pinned.sha256[:16]}...: "
                                "refused, nothing kept (a corrupt file or a wrong mirror)")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fetch(pinned: PinnedFile, dest: Path, base: str, retry: Retry, stop: threading.Event | None = None) -> int:
    """Fetch one pinned file into `dest` with retries and exponential back-off; returns the bytes fetched."""
    url = url_of(pinned.host_path, base)
    for attempt in range(1, retry.attempts + 1):
        if stop is not None and stop.is_set():
            return 0
        try:
            _fetch_once(url, pinned, dest, retry.timeout_s)
            return pinned.size
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
            if stop is not None:
                stop.wait(delay)
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

    from fruitpipe.monitor.logs import json_mode

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
    stop = threading.Event()
    fetched = 0
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=quiet or json_mode(), leave=False) as bar, \
            ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="fruitpipe-download") as pool:
        futures = [pool.submit(fetch, p, folder / p.dest, base, retry, stop) for p in todo]
        try:
            for future in as_completed(futures):
                n = future.result()
                fetched += 1
                bar.update(n)
        except BaseException:
            stop.set()
            for f in futures:
                f.cancel()
            raise
    return FetchReport(kept, fetched, total)
