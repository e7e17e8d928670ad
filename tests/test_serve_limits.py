"""`serve` under hostile or unlucky clients: bodies counted as they arrive whatever the transfer encoding (never
spooled), uploads that stall get 408, decodes are capped with a bounded queue (503 + Retry-After beyond), and the
small holes: HEAD, API docs off, framing, too-small images, too many parts, a damaged classifier. Real uvicorn on
127.0.0.1, raw sockets where http.client would not send what a client can."""

from __future__ import annotations

import io
import shutil
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
