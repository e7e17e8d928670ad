"""The writer's lease: an owner is declared dead by pid only when the pid means the same process here (host, boot,
PID namespace and start time all match), and every failed request to S3 is one line naming what to check."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fruitpipe import lease
from fruitpipe.errors import OutputError
from fruitpipe.storage import StorageOptions

pytestmark = pytest.mark.skipif(lease.identity()["pid_ns"] is None, reason="needs Linux's /proc")


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


def _write_lease(out: Path, owner: dict, heartbeat_age: float = 1.0) -> None:
    out.mkdir(exist_ok=True)
    now = time.time()
    (out / lease.LEASE).write_text(json.dumps({"token": "other", **owner, "heartbeat_at": now - heartbeat_age,
                                               "acquired_at": now - 60, "ttl_s": 120}))


def _try(out: Path) -> str:
    """'taken' if this process takes the lease over, else the one-line refusal."""
    try:
        with lease.hold(str(out), "me", StorageOptions()):
            return "taken"
    except lease.LeaseHeldError as exc:
        return str(exc)


def test_identity_names_this_process() -> None:
    me = lease.identity()
    assert me["pid"] == os.getpid() and me["host"] == socket.gethostname()
    assert me["boot_id"] and me["pid_ns"].startswith("pid:[") and isinstance(me["pid_start"], int)
    assert lease.start_time(_dead_pid()) is None


def test_a_dead_owner_in_this_pid_namespace_is_taken_over_at_once(tmp_path: Path) -> None:
    _write_lease(tmp_path / "out", {**lease.identity(_dead_pid())})
    assert _try(tmp_path / "out") == "taken"


def test_a_live_owner_with_a_pid_of_another_namespace_is_not_taken_over(tmp_path: Path) -> None:
    # Two containers sharing a host name: the other's pid means nothing here, dead or alive, until its TTL.
    for pid in (_dead_pid(), os.getppid()):
        _write_lease(tmp_path / "out", {**lease.identity(pid), "pid_ns": "pid:[4026531999]"})
        assert "being written by another run" in _try(tmp_path / "out")
    _write_lease(tmp_path / "out", {**lease.identity(_dead_pid()), "pid_ns": "pid:[4026531999]"}, heartbeat_age=500)
    assert _try(tmp_path / "out") == "taken"  # its heartbeat expired: taken over by the TTL


def test_another_boot_or_an_older_lease_waits_for_the_heartbeat(tmp_path: Path) -> None:
    dead = _dead_pid()
    _write_lease(tmp_path / "out", {**lease.identity(dead), "boot_id": "00000000-0000-0000-0000-000000000000"})
    assert "being written by another run" in _try(tmp_path / "out")
    _write_lease(tmp_path / "out", {"host": socket.gethostname(), "pid": dead})  # written before these fields
    assert "being written by another run" in _try(tmp_path / "out")


def test_a_reused_pid_is_a_dead_owner_but_the_same_process_is_alive(tmp_path: Path) -> None:
    alive = lease.identity(os.getppid())  # a running process (pytest's parent), as its own lease would say
    _write_lease(tmp_path / "out", alive)
    assert "being written by another run" in _try(tmp_path / "out")
    _write_lease(tmp_path / "out", {**alive, "pid_start": alive["pid_start"] - 1})  # that pid is now another process
    assert _try(tmp_path / "out") == "taken"


def test_the_lease_records_this_process(tmp_path: Path) -> None:
    # What a later run on this machine compares against.
    with lease.hold(str(tmp_path / "out"), "me", StorageOptions()):
        doc = json.loads((tmp_path / "out" / lease.LEASE).read_text())
    assert {k: doc[k] for k in ("host", "boot_id", "pid_ns", "pid", "pid_start")} == lease.identity()


# -- S3 requests that fail: one line, naming what to check -------------------------------------------------------

class _Refusing(BaseHTTPRequestHandler):
    """An S3 endpoint answering every request with one error code."""

    code = "AccessDenied"
    status = 403

    def _answer(self) -> None:
        body = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{self.code}</Code>"
                f"<Message>refused by the test</Message></Error>").encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_DELETE = do_HEAD = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(("code", "status"), [("AccessDenied", 403), ("ExpiredToken", 400)])
def test_a_refused_lease_request_is_one_line(code: str, status: int) -> None:
    handler = type("H", (_Refusing,), {"code": code, "status": status})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(OutputError) as got:
            with lease.hold("s3://bucket/out", "me", StorageOptions(f"http://127.0.0.1:{server.server_port}")):
                pass
    finally:
        server.shutdown()
    msg = str(got.value)
    assert "\n" not in msg and f"S3 answered {code}" in msg and "s3://bucket/out/_lease.json" in msg


def test_an_unreachable_endpoint_or_no_credentials_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(OutputError, match="could not read the writer's lease") as got:
        with lease.hold("s3://bucket/out", "me", StorageOptions(f"http://127.0.0.1:{port}")):
            pass
    assert "\n" not in str(got.value) and "--s3-endpoint" in str(got.value)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(OutputError, match="no AWS credentials found"):
        with lease.hold("s3://bucket/out", "me", StorageOptions(f"http://127.0.0.1:{port}")):
            pass
