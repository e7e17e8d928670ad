"""`serve` under hostile or unlucky clients: bodies counted as they arrive whatever the transfer encoding (never
spooled), uploads that stall get 408, decodes are capped with a bounded queue (503 + Retry-After beyond), and the
small holes: HEAD, API docs off, framing, too-small images, too many parts, a damaged classifier. Real uvicorn on
127.0.0.1, raw sockets where http.client would not send what a client can."""

from __future__ import annotations

import io
import shutil
import signal
import socket
import threading
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from fruitpipe.cli import main
from fruitpipe.serve import ServeSettings, create_app
from test_serve import _Server

LIMIT = 2_000_000


@pytest.fixture(scope="module")
def photo(trained) -> bytes:
    return Path(pq.read_table(trained["out"] / "classifier" / "test_predictions.parquet").column("uri")[0].as_py()
                ).read_bytes()


@pytest.fixture(scope="module")
def server(trained):
    srv = _Server(create_app(ServeSettings(output=str(trained["out"]), max_bytes=LIMIT, body_timeout=1.0)))
    yield srv
    srv.stop()


def _multipart(data: bytes, parts: int = 1) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b"".join((f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"p{i}.jpg\"\r\n"
                     "Content-Type: image/jpeg\r\n\r\n").encode() + data + b"\r\n" for i in range(parts))
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _status(sock: socket.socket) -> tuple[int, bytes]:
    sock.settimeout(60)
    raw = b""
    while b"\r\n\r\n" not in raw:
        got = sock.recv(65536)
        if not got:
            break
        raw += got
    head, _, body = raw.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        got = sock.recv(65536)
        if not got:
            break
        body += got
    return int(raw.split(b" ", 2)[1]), head + b"\r\n\r\n" + body


def test_a_chunked_body_that_never_ends_is_refused_once_over_the_limit(server, photo: bytes) -> None:
    """No Content-Length and no last chunk: a server that read to the end (or spooled to disk) never answers."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    _, ctype = _multipart(b"")
    sock.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                 "Transfer-Encoding: chunked\r\n\r\n".encode())
    chunk = b"%x\r\n" % (256 * 1024) + b"\xff" * (256 * 1024) + b"\r\n"
    sent = 0
    sock.setblocking(False)
    answered = False
    while sent < 200 * LIMIT:
        try:
            if sock.recv(1, socket.MSG_PEEK):
                answered = True
                break
        except BlockingIOError:
            pass
        try:
            sent += sock.send(chunk)
        except BlockingIOError:
            import select

            select.select([sock], [sock], [], 5)
        except (BrokenPipeError, ConnectionResetError):
            answered = True
            break
    assert answered, f"no answer after {sent} bytes of an endless chunked upload"
    sock.setblocking(True)
    status, raw = _status(sock)
    assert status == 413 and b"too_big" in raw
    sock.close()
    # a normal chunked upload still works
    body, ctype = _multipart(photo)
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nTransfer-Encoding: chunked\r\n"
                 f"Connection: close\r\n\r\n".encode() + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
    assert _status(sock)[0] == 200
    sock.close()


def test_an_upload_that_stalls_gets_408_and_the_server_goes_on(server, photo: bytes) -> None:
    body, ctype = _multipart(photo)
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:1000])  # then nothing more
    status, raw = _status(sock)
    assert status == 408 and b"timeout" in raw
    sock.close()
    assert server.predict(photo)[0] == 200


def test_decodes_are_capped_and_a_full_queue_gets_503_with_retry_after(trained, photo: bytes) -> None:
    app = create_app(ServeSettings(output=str(trained["out"]), decoders=1, queue=0))
    clf = app.state.classifier
    entered, release = threading.Event(), threading.Event()
    real = clf.photo_probabilities

    def held(data: bytes, max_pixels: int):
        entered.set()
        assert release.wait(60)
        return real(data, max_pixels)

    clf.photo_probabilities = held
    srv = _Server(app)
    try:
        first: list = []
        t = threading.Thread(target=lambda: first.append(srv.predict(photo)))
        t.start()
        assert entered.wait(60)  # the one decoder is busy
        body, ctype = _multipart(photo)
        status, raw = srv.request("POST", "/predict", body, {"Content-Type": ctype})
        assert status == 503 and b"busy" in raw
        release.set()
        t.join(60)
        assert first[0][0] == 200
        assert srv.predict(photo)[0] == 200  # the slot is free again
    finally:
        release.set()
        srv.stop()


def test_the_small_holes_are_closed(server, photo: bytes) -> None:
    for path in ("/", "/health"):
        assert server.request("HEAD", path)[0] == 200
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert server.request("GET", path)[0] == 404
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("GET", "/")
    csp = conn.getresponse().getheader("Content-Security-Policy")
    conn.close()
    assert "frame-ancestors 'none'" in csp
    tiny = io.BytesIO()
    Image.new("RGB", (1, 1), (200, 0, 0)).save(tiny, "PNG")
    status, body = server.predict(tiny.getvalue())
    assert (status, body["error"]) == (422, "too_small")
    data, ctype = _multipart(photo, parts=2)
    status, raw = server.request("POST", "/predict", data, {"Content-Type": ctype})
    assert status == 400 and b"bad_request" in raw


def test_a_damaged_classifier_is_one_line(trained, tmp_path: Path, capsys) -> None:
    shutil.copytree(trained["out"] / "classifier", tmp_path / "out" / "classifier")
    onnx = tmp_path / "out" / "classifier" / "fruit_classifier.onnx"
    onnx.write_bytes(onnx.read_bytes()[:5000])
    assert main(["serve", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a usable classifier" in err[0]


def test_an_s3_endpoint_that_does_not_answer_is_one_line(capsys) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["serve", "s3://bucket/out", "--s3-endpoint", f"http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not read s3://bucket/out/classifier/fruit_classifier.onnx" in err[0]


def test_api_docs_on_request(trained) -> None:
    srv = _Server(create_app(ServeSettings(output=str(trained["out"]), api_docs=True)))
    try:
        assert srv.request("GET", "/openapi.json")[0] == 200
    finally:
        srv.stop()


# -- the connection layer: headers on time, a cap on connections, one budget for buffered uploads --------------

class _Bounded(_Server):
    """_Server with a chosen protocol and tighter limits, for the connection-layer tests."""

    def __init__(self, app, protocol, header_timeout: float = 1.0, max_connections: int = 64) -> None:
        super().__init__(app, protocol, header_timeout, max_connections)


def _protocols() -> list:
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    return [H11Protocol, HttpToolsProtocol]


def _closed_after(sock: socket.socket) -> tuple[int, bytes]:
    """The answer, then the server's close (recv gives b'')."""
    status, raw = _status(sock)
    sock.settimeout(60)
    assert sock.recv(1) == b""
    return status, raw


@pytest.mark.parametrize("protocol", _protocols(), ids=lambda p: p.__name__)
def test_half_sent_headers_get_408_and_the_connection_closes(trained, protocol) -> None:
    srv = _Bounded(create_app(ServeSettings(output=str(trained["out"]))), protocol, header_timeout=1.0)
    try:
        sock = socket.create_connection(("127.0.0.1", srv.port))
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data")  # and no more
        assert _closed_after(sock)[0] == 408
        sock.close()
        # On a kept-alive connection: the first request answered, the next one's headers never complete.
        sock = socket.create_connection(("127.0.0.1", srv.port))
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _status(sock)[0] == 200
        sock.sendall(b"GET /health HTTP/1.1\r\nHost:")
        assert _closed_after(sock)[0] == 408
        sock.close()
        # A request whose body is slow but whose headers were on time is the body timeout's business: answered.
        assert srv.request("GET", "/health")[0] == 200
    finally:
        srv.stop()


def test_connections_past_the_cap_are_refused_at_once(trained) -> None:
    srv = _Bounded(create_app(ServeSettings(output=str(trained["out"]))), _protocols()[1], header_timeout=30.0,
                   max_connections=4)
    idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(4)]
    try:
        for s in idle:  # each known to the server: it answered a request on it
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _status(s)[0] == 200
        extra = socket.create_connection(("127.0.0.1", srv.port))
        status, raw = _closed_after(extra)
        assert status == 503 and b"Retry-After: 1" in raw
        extra.close()
    finally:
        for s in idle:
            s.close()
    try:
        import time

        deadline = time.monotonic() + 60
        while True:  # the server sees the closes as events; poll for them, not a fixed wait
            try:
                if srv.request("GET", "/health")[0] == 200:
                    break
            except (ConnectionError, OSError):
                pass
            assert time.monotonic() < deadline, "the server did not take connections again"
            time.sleep(0.05)
    finally:
        srv.stop()


def _buffered(srv) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    _, raw = srv.request("GET", "/metrics")
    return next(s.value for f in text_string_to_metric_families(raw.decode()) for s in f.samples
                if s.name == "fruitpipe_upload_bytes_buffered")


def test_stalled_uploads_share_one_memory_budget(trained, photo: bytes) -> None:
    import time

    srv = _Server(create_app(ServeSettings(output=str(trained["out"]), max_bytes=LIMIT, body_timeout=60.0,
                                           max_buffered=2_802_000)))  # room for the two, not a photo more
    stalled = []
    try:
        for _ in range(2):  # two uploads that send 1.4 MB of a 1.9 MB body, then stop
            body, ctype = _multipart(b"\xff" * 1_900_000)
            s = socket.create_connection(("127.0.0.1", srv.port))
            s.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:1_400_000])
            stalled.append(s)
        deadline = time.monotonic() + 60
        while _buffered(srv) < 2_800_000:  # observable: the server holds both
            assert time.monotonic() < deadline, f"the server holds {_buffered(srv)} bytes"
            time.sleep(0.05)
        status, raw = srv.request("POST", "/predict", *_form(photo))
        assert status == 503 and b"busy" in raw
        for s in stalled:
            s.close()
        while _buffered(srv) > 0:  # the stalled requests end with their connections and free their bytes
            assert time.monotonic() < deadline, f"still {_buffered(srv)} bytes held"
            time.sleep(0.05)
        assert srv.predict(photo)[0] == 200
    finally:
        for s in stalled:
            s.close()
        srv.stop()


def _form(data: bytes) -> tuple[bytes, dict[str, str]]:
    body, ctype = _multipart(data)
    return body, {"Content-Type": ctype}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_stopped_by_a_signal_exits_130_like_the_other_commands(trained, sig) -> None:
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "fruitpipe.cli", "serve", str(trained["out"]), "--port",
                             str(port), "-q"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:  # ready when /health answers (an event, polled)
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.1)
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_model_that_overflows_on_a_photo_gets_no_answer(trained, photo: bytes) -> None:
    import numpy as np

    app = create_app(ServeSettings(output=str(trained["out"])))
    clf = app.state.classifier
    real = clf.photo_probabilities
    clf.photo_probabilities = lambda data, max_pixels: np.full_like(real(data, max_pixels), np.nan)
    srv = _Server(app)
    try:
        status, body = srv.predict(photo)
        assert (status, body["error"]) == (422, "not_finite")
    finally:
        srv.stop()


#: 89 bytes of PostScript: Pillow's EPS plug-in would hand it to Ghostscript (through a temp file on disk).
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n"
       b"0 0 moveto 64 64 lineto stroke\nshowpage\n")


def _jpeg2000(side: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buf, "JPEG2000")
    return buf.getvalue()


def test_only_the_formats_phones_produce_are_decoded(server, photo: bytes, monkeypatch) -> None:
    """An EPS or a JPEG 2000 upload is 415 not_an_image before any plug-in but the allowed ones reads a byte:
    Ghostscript never runs, nothing is written to a temp file; the formats a phone makes are still answered."""
    import tempfile

    from PIL import EpsImagePlugin, Jpeg2KImagePlugin

    touched: list[str] = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: touched.append("ghostscript"))
    monkeypatch.setattr(tempfile, "mkstemp", lambda *a, **k: touched.append("mkstemp"))
    real_open = Jpeg2KImagePlugin.Jpeg2KImageFile._open
    monkeypatch.setattr(Jpeg2KImagePlugin.Jpeg2KImageFile, "_open",
                        lambda self: touched.append("jpeg2000") or real_open(self))
    for data in (EPS, _jpeg2000()):
        body, ctype = _multipart(data)
        status, answer = server.request("POST", "/predict", body, {"Content-Type": ctype})
        assert status == 415 and b"not_an_image" in answer, (status, answer[:200])
    assert touched == []
    rgb = Image.open(io.BytesIO(photo)).convert("RGB")
    for fmt in ("PNG", "WEBP", "GIF", "BMP", "TIFF"):
        buf = io.BytesIO()
        rgb.save(buf, fmt)
        body, ctype = _multipart(buf.getvalue())
        status, answer = server.request("POST", "/predict", body, {"Content-Type": ctype})
        assert status == 200, (fmt, status, answer[:200])
