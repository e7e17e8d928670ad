"""A writer's lease on an output: one run at a time, with an owner, a heartbeat and takeover of a dead owner's lease.

Local (and shared-folder) outputs serialise every change of the lease file under an exclusive `flock`; S3 uses
conditional writes (If-None-Match to create, If-Match on the ETag to renew or take over), which S3 has supported
since 2024, so two drivers can never both believe they hold it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from fruitpipe import storage
from fruitpipe.errors import OutputError
from fruitpipe.storage import StorageOptions

log = logging.getLogger(__name__)

LEASE = "_lease.json"
#: A lease whose heartbeat is older than this is a dead owner's (a live run renews it every TTL / 4).
TTL_S = 120.0


class LeaseHeldError(OutputError):
    """Another live run holds the output's lease."""


class LeaseLostError(OutputError):
    """This run's lease was taken over (it stalled past the TTL): it must not publish."""


def _read_text(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")  # e.g. "pid:[4026531836]": one per container
    except OSError:
        return None


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): tells a reused pid apart."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])  # the command name, in parentheses, may hold spaces
    except (IndexError, ValueError):
        return None


def identity(pid: int | None = None) -> dict[str, Any]:
    """What names a process uniquely on a machine: host name, boot id, PID namespace, pid and its start time.
    Two containers may share a host name (host networking, a fixed `hostname:`) but never all of these."""
    pid = os.getpid() if pid is None else pid
    return {"host": socket.gethostname(), "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
            "pid_ns": _pid_namespace(), "pid": pid, "pid_start": start_time(pid)}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_dead(doc: dict[str, Any], me: dict[str, Any]) -> bool:
    """True only when `doc`'s owner is provably gone: same host, boot and PID namespace as this process (so its
    pid means the same process here), and that pid is not running or now belongs to a later process. Anything
    else (another container, another boot, an older lease without these fields) waits for the heartbeat's TTL."""
    if not isinstance(doc.get("pid"), int) or me["boot_id"] is None or me["pid_ns"] is None:
        return False
    if any(doc.get(k) != me[k] for k in ("host", "boot_id", "pid_ns")):
        return False
    if not _pid_alive(doc["pid"]):
        return True
    return doc.get("pid_start") is not None and start_time(doc["pid"]) not in (None, doc["pid_start"])


def _store_error(uri: str, action: str, exc: Exception) -> OutputError:
    """One line for a failed request to the lease's store (no credentials, unreachable endpoint, AccessDenied,
    an expired token), naming what to check."""
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        why = "no AWS credentials found (the default chain: environment, ~/.aws, instance or container role)"
    elif isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        why = f"S3 answered {err.get('Code', '?')}: {err.get('Message', '')}".rstrip(": ")
    else:
        why = f"{type(exc).__name__}: {exc}"
    return OutputError(f"could not {action} the writer's lease {uri}: {why}; check the credentials, --s3-endpoint "
                       "and s3:GetObject/PutObject/DeleteObject on OUTPUT/_lease.json, then re-run")


@dataclass
class Lease:
    """A held lease; `check()` raises LeaseLostError if another run took it over."""

    out: str
    owner: dict[str, Any]
    opts: StorageOptions
    ttl_s: float = TTL_S
    _etag: str | None = None
    _lost: bool = False
    _fd: int | None = None
    _client: Any = None

    @property
    def uri(self) -> str:
        """Where the lease lives."""
        return storage.join(self.out, LEASE)

    # -- one store-specific compare-and-swap, used for acquire, renew and release ------------------------------

    @contextlib.contextmanager
    def _local_lock(self) -> Iterator[None]:
        """Hold flock on the lease file itself: it is never deleted or renamed (a waiter would then lock a stale
        inode), only rewritten in place under the lock; a released lease is marked so."""
        path = storage.normalize(self.uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._fd = fd
            yield
        finally:
            self._fd = None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _s3(self) -> tuple[Any, str, str]:
        import boto3

        bucket, _, key = self.uri[len("s3://"):].partition("/")
        if self._client is None:  # its own session: the heartbeat thread shares no boto3 state with the caller
            self._client = boto3.session.Session().client("s3", region_name=self.opts.region,
                                                          endpoint_url=self.opts.s3_endpoint)
        return self._client, bucket, key

    def _read(self) -> tuple[dict[str, Any] | None, str | None]:
        """(current lease, its ETag on S3), or (None, None) when there is none."""
        if storage.is_s3(self.uri):
            from botocore.exceptions import BotoCoreError, ClientError

            client, bucket, key = self._s3()
            try:
                obj = client.get_object(Bucket=bucket, Key=key)
                body = obj["Body"].read()
            except client.exceptions.NoSuchKey:
                return None, None
            except (BotoCoreError, ClientError) as exc:
                raise _store_error(self.uri, "read", exc) from None
            etag = obj["ETag"]
        else:
            assert self._fd is not None, "local lease read outside its lock"
            os.lseek(self._fd, 0, os.SEEK_SET)
            body, etag = os.read(self._fd, 1 << 16), None
        if not body.strip():
            return None, None
        try:
            doc = json.loads(body)
        except ValueError:  # a corrupt lease file belongs to nobody
            return {"owner": "corrupt", "heartbeat_at": 0}, etag
        return (None, etag) if doc.get("released") else (doc, etag)

    def _write(self, doc: dict[str, Any] | None, expect_etag: str | None, create: bool) -> bool:
        """Write (or delete, doc=None) the lease if it is still what was read; False if someone changed it."""
        if storage.is_s3(self.uri):
            client, bucket, key = self._s3()
            from botocore.exceptions import BotoCoreError, ClientError

            try:
                if doc is None:
                    client.delete_object(Bucket=bucket, Key=key, **({"IfMatch": expect_etag} if expect_etag else {}))
                    return True
                cond = {"IfNoneMatch": "*"} if create else {"IfMatch": expect_etag or "*"}
                resp = client.put_object(Bucket=bucket, Key=key, Body=json.dumps(doc).encode(), **cond)
                self._etag = resp["ETag"]
                return True
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                    return False
                raise _store_error(self.uri, "write", exc) from None
            except BotoCoreError as exc:
                raise _store_error(self.uri, "write", exc) from None
        assert self._fd is not None, "local lease written outside its lock"
        body = json.dumps({"released": True, "released_at": time.time()} if doc is None else doc).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, body, 0)
        os.fsync(self._fd)
        return True

    # -- protocol ------------------------------------------------------------------------------------------------

    def _stale(self, doc: dict[str, Any]) -> str | None:
        """Why `doc` (another owner's lease) may be taken over, or None if its owner looks alive."""
        age = time.time() - float(doc.get("heartbeat_at", 0))
        if owner_dead(doc, self.owner):
            return f"its owner (pid {doc['pid']} on this host) is dead"
        if age > float(doc.get("ttl_s", self.ttl_s)):
            return f"its heartbeat is {age:.0f} s old (TTL {doc.get('ttl_s', self.ttl_s):.0f} s)"
        return None

    def _transaction(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext() if storage.is_s3(self.uri) else self._local_lock()

    def acquire(self) -> None:
        """Take the lease or raise LeaseHeldError with one line naming the live owner."""
        with self._transaction():
            current, etag = self._read()
            doc = {**self.owner, "acquired_at": time.time(), "heartbeat_at": time.time(), "ttl_s": self.ttl_s}
            if current is not None and current.get("token") != self.owner["token"]:
                why = self._stale(current)
                if why is None:
                    age = time.time() - float(current.get("heartbeat_at", 0))
                    since = time.strftime("%H:%M:%S", time.localtime(current.get("acquired_at", 0)))
                    raise LeaseHeldError(
                        f"output {self.out} is being written by another run (pid {current.get('pid')} on "
                        f"{current.get('host')}, started {since}, "
                        f"heartbeat {age:.0f} s ago): wait for it to finish, or use another OUTPUT"
                    )
                log.warning("taking over the lease of %s: %s", self.out, why)
            ok = self._write(doc, etag, create=current is None)
        if not ok:
            raise LeaseHeldError(f"output {self.out} was claimed by another run at the same moment: wait for it to "
                                 "finish, or use another OUTPUT")

    def renew(self) -> None:
        """Move the heartbeat forward; marks the lease lost if another run took it over."""
        with self._transaction():
            current, etag = self._read()
            if current is None or current.get("token") != self.owner["token"]:
                self._lost = True
                return
            if not self._write({**current, "heartbeat_at": time.time()}, etag, create=False):
                self._lost = True

    def check(self) -> None:
        """Raise LeaseLostError if this run no longer holds the lease (checked before every publish)."""
        self.publish(lambda: None)

    def publish(self, write: Callable[[], None]) -> None:
        """Check the lease is ours and run `write` in the same transaction: locally under the lease file's lock,
        which a takeover must also take, so none can fall between the check and the write."""
        with self._transaction():
            if not self._lost:
                current, _ = self._read()
                self._lost = current is None or current.get("token") != self.owner["token"]
            if self._lost:
                raise LeaseLostError(f"this run lost its lease on {self.out} (it stalled longer than "
                                     f"{self.ttl_s:.0f} s and another run took over): nothing more was published; "
                                     "re-run the command")
            write()

    def release(self) -> None:
        """Give the lease back if it is still ours."""
        with self._transaction():
            current, etag = self._read()
            if current is not None and current.get("token") == self.owner["token"]:
                self._write(None, etag, create=False)


@contextlib.contextmanager
def hold(out: str, token: str, opts: StorageOptions | None = None, ttl_s: float = TTL_S) -> Iterator[Lease]:
    """Hold the lease of `out` for the block, renewing it every ttl_s / 4 from a daemon thread."""
    owner = {"token": token, **identity()}
    lease = Lease(storage.normalize(out), owner, opts or storage.current(), ttl_s)
    lease.acquire()
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(max(ttl_s / 4, 1.0)):
            try:
                lease.renew()
            except Exception as exc:  # a failed renewal is retried; the TTL leaves room for several
                log.warning("could not renew the lease of %s: %s", out, exc)

    thread = threading.Thread(target=beat, name="fruitpipe-lease", daemon=True)
    thread.start()
    try:
        yield lease
    finally:
        stop.set()
        thread.join(timeout=5)
        try:
            lease.release()
        except Exception as exc:  # an unreachable store: the lease then expires by its TTL
            log.warning("could not release the lease of %s (it expires in %.0f s): %s", out, ttl_s, exc)
