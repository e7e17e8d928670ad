"""`serve` against slow, pipelined and oversized clients (issue 37, items 1, 2, 4 and 6): a whole upload has a
deadline, a stopping server closes the uploads still arriving, one connection queues a bounded number of pipelined
requests, headers have a size limit (431), a refused upload closes its connection, and refused connections are
counted in /metrics and summarised in the log, not one line each. Real uvicorn on 127.0.0.1, raw sockets."""

from __future__ import annotations

import logging
import socket
import time

import pytest

from fruitpipe.serve import ServeSettings, create_app
from fruitpipe.serve.server import MAX_HEADER_BYTES, MAX_PIPELINED
from test_serve import _Server
from test_serve_limits import _Bounded, _buffered, _closed_after, _multipart, _protocols, _status


def _metric(srv, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    _, raw = srv.request("GET", "/metrics")
    return sum(s.value for f in text_string_to_metric_families(raw.decode()) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _read_to_close(sock: socket.socket) -> bytes:
    """Every byte the server sends until it closes the connection (or resets it), then close our end."""
    sock.settimeout(60)
    answers = b""
    while True:
        try:
            got = sock.recv(65536)
        except ConnectionResetError:
            break
        if not got:
            break
        answers += got
    sock.close()
    return answers


def _upload_head(port: int, length: int) -> socket.socket:
    body, ctype = _multipart(b"\xff" * length)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:1000])
    return sock


def test_a_dripping_upload_meets_the_whole_upload_deadline(trained) -> None:
    """One byte every 0.2 s never trips the 5 s body timeout; the 7 s whole-upload deadline ends it with 408 and a
    closed connection (before: served for as long as the client dripped). The body timeout is 25 times the drip's
    interval: with 1 s (5 times), a 2-core CI machine under load once let 1 s pass between two bytes."""
    srv = _Server(create_app(ServeSettings(output=str(trained["out"]), body_timeout=5.0, upload_timeout=7.0)))
    try:
        sock = _upload_head(srv.port, 100_000)
        sock.setblocking(False)
        started, answer = time.monotonic(), b""

        def whole(answer: bytes) -> bool:  # headers and the body their content-length announces
            head, sep, body = answer.partition(b"\r\n\r\n")
            length = [int(ln.split(b":")[1]) for ln in head.lower().split(b"\r\n") if ln.startswith(b"content-length:")]
            return bool(sep) and len(body) >= (length[0] if length else 0)

        while not whole(answer):
            assert time.monotonic() - started < 30, "the dripping upload was never cut off"
            try:
                got = sock.recv(65536)
                if not got:
                    break
                answer += got
            except BlockingIOError:
                try:
                    sock.send(b"\xff")
                except OSError:
                    pass
                time.sleep(0.2)
        assert answer.startswith(b"HTTP/1.1 408") and b"upload-timeout" in answer, answer[:300]
        assert b"connection: close" in answer.lower()
        sock.close()
        assert srv.request("GET", "/health")[0] == 200
    finally:
        srv.stop()


@pytest.mark.parametrize("protocol", _protocols(), ids=lambda p: p.__name__)
def test_a_stopping_server_closes_uploads_still_arriving(trained, protocol) -> None:
    """SIGTERM's graceful shutdown (uvicorn's should_exit): an upload half sent gets 503 and the server stops at once,
    not after --body-timeout (60 s here; a dripping client kept a stopped server alive for 59 s before)."""
    srv = _Bounded(create_app(ServeSettings(output=str(trained["out"]), body_timeout=60.0, upload_timeout=600.0)),
                   protocol, header_timeout=30.0)
    sock = _upload_head(srv.port, 1_000_000)
    try:
        deadline = time.monotonic() + 60
        while _buffered(srv) < 1000:  # observable: the server holds the upload's first bytes
            assert time.monotonic() < deadline
            time.sleep(0.05)
        stopping = time.monotonic()
        srv.server.should_exit = True
        status, _ = _closed_after(sock)
        srv.thread.join(timeout=30)
        assert status == 503 and not srv.thread.is_alive()
        assert time.monotonic() - stopping < 20, "the server waited for the upload's body timeout"
    finally:
        sock.close()
        srv.stop()


def test_pipelined_requests_are_bounded_per_connection(trained) -> None:
    """1 MiB of pipelined GET /health on one connection (httptools parses a whole read at once): at most
    MAX_PIPELINED requests queue behind the first; they are answered, then the connection closes (the client sends
    the rest again); the server goes on (before: every request of the read queued, 96 MB per MiB)."""
    srv = _Bounded(create_app(ServeSettings(output=str(trained["out"]))), _protocols()[1], header_timeout=30.0)
    try:
        request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        sock = socket.create_connection(("127.0.0.1", srv.port))
        try:
            sock.sendall(request * (1024 * 1024 // len(request)))
        except OSError:  # the server closed while we were still sending: what is asked of it
            pass
        answers = _read_to_close(sock)
        ok = answers.count(b"HTTP/1.1 200")
        assert ok == MAX_PIPELINED + 1 and answers.count(b"HTTP/1.1 ") == ok, (ok, answers[-300:])
        assert srv.request("GET", "/health")[0] == 200
        assert _metric(srv, "fruitpipe_connections_refused_total", reason="pipelined") == 1
    finally:
        srv.stop()


def test_queued_pipelined_requests_count_in_the_memory_budget(trained) -> None:
    """The requests a connection queues by pipelining hold their request line and headers in memory: they are
    counted in the one budget uploads count in (--max-buffered-mb), and the queue stops where it is full (here 10,000
    bytes: two queued requests of about 4 KiB fit, the third does not), well before MAX_PIPELINED; the queued ones
    are answered, the connection closes, and every counted byte is given back."""
    srv = _Bounded(create_app(ServeSettings(output=str(trained["out"]), max_buffered=10_000)), _protocols()[1],
                   header_timeout=30.0)
    try:
        request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 4000 + b"\r\n\r\n"
        sock = socket.create_connection(("127.0.0.1", srv.port))
        try:
            sock.sendall(request * 10)  # one read: httptools parses all of it at once
        except OSError:
            pass
        answers = _read_to_close(sock)
        ok = answers.count(b"HTTP/1.1 200")
        assert ok == 3 < MAX_PIPELINED + 1 and answers.count(b"HTTP/1.1 ") == ok, (ok, answers[-300:])
        assert _metric(srv, "fruitpipe_connections_refused_total", reason="pipelined") == 1
        deadline = time.monotonic() + 30
        while _buffered(srv) != 0:  # observable: every queued request's bytes given back
            assert time.monotonic() < deadline, _buffered(srv)
            time.sleep(0.05)
        assert srv.request("GET", "/health")[0] == 200
    finally:
        srv.stop()


@pytest.mark.parametrize("protocol", _protocols(), ids=lambda p: p.__name__)
def test_headers_past_the_limit_get_431(trained, protocol) -> None:
    srv = _Bounded(create_app(ServeSettings(output=str(trained["out"]))), protocol, header_timeout=30.0)
    try:
        filler = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 40) for i in range(MAX_HEADER_BYTES // 40))
        sock = socket.create_connection(("127.0.0.1", srv.port))
        try:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + filler * 4)  # 4x the limit, never ended
        except OSError:
            pass
        status, _ = _closed_after(sock)
        sock.close()
        assert status == 431
        # Headers just under the limit, sent in small pieces, are answered.
        sock = socket.create_connection(("127.0.0.1", srv.port))
        head = b"GET /health HTTP/1.1\r\nHost: x\r\n" + filler[: MAX_HEADER_BYTES - 1000].rpartition(b"\r\n")[0]
        for i in range(0, len(head), 4096):
            sock.sendall(head[i:i + 4096])
        sock.sendall(b"\r\n\r\n")
        assert _status(sock)[0] == 200
        sock.close()
        assert _metric(srv, "fruitpipe_connections_refused_total", reason="header_too_large") == 1
    finally:
        srv.stop()


def test_an_early_413_closes_the_connection(trained) -> None:
    """Content-Length over the limit: 413 with Connection: close, and the connection closes; the rest of the body is
    not read and discarded (before: read for up to --header-timeout, then an unsolicited 408)."""
    srv = _Server(create_app(ServeSettings(output=str(trained["out"]), max_bytes=1_000_000)))
    try:
        sock = socket.create_connection(("127.0.0.1", srv.port))
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 500000000\r\n\r\n" + b"\xff" * 65536)
        status, raw = _closed_after(sock)
        sock.close()
        assert status == 413 and b"connection: close" in raw.lower() and b"408" not in raw
    finally:
        srv.stop()


@pytest.mark.parametrize("protocol", _protocols(), ids=lambda p: p.__name__)
def test_an_upload_answered_before_its_end_is_not_reset(trained, protocol) -> None:
    """A client that sends its whole body before reading (http.client, most libraries) reads the 413, then a clean
    end. Before, the server closed with the body unread and the kernel's reset could reach the client first (CI of
    stop 41: ConnectionResetError on a 3 MB upload). The client sends the body only after the answer came: closing at
    once fails this every time; lingering (answer, shut the write side, drop what comes) passes."""
    srv = _Bounded(create_app(ServeSettings(output=str(trained["out"]), max_bytes=1_000_000)), protocol,
                   header_timeout=5.0)
    try:
        body, ctype = _multipart(b"\xff" * 3_000_000)
        sock = socket.create_connection(("127.0.0.1", srv.port))
        sock.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode())
        status, raw = _status(sock)
        assert status == 413 and b"too_big" in raw and b"connection: close" in raw.lower()
        sock.sendall(body)  # the rest, as a client that writes before it reads does
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(60)
        assert sock.recv(65536) == b""  # the server's end, not a reset
        sock.close()
    finally:
        srv.stop()


def test_refused_connections_are_counted_and_summarised_not_logged_each(trained, caplog) -> None:
    srv = _Bounded(create_app(ServeSettings(output=str(trained["out"]))), _protocols()[1], header_timeout=30.0,
                   max_connections=2)
    held = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(2)]
    try:
        for s in held:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _status(s)[0] == 200
        with caplog.at_level(logging.INFO, logger="fruitpipe.serve.server"):
            for _ in range(30):
                extra = socket.create_connection(("127.0.0.1", srv.port))
                assert _closed_after(extra)[0] == 503
                extra.close()
        lines = [r for r in caplog.records if "refused" in r.getMessage()]
        assert len(lines) == 1 and lines[0].levelno == logging.WARNING, [r.getMessage() for r in lines]
        assert "max_connections" in lines[0].getMessage()
        for s in held:
            s.close()
        deadline = time.monotonic() + 60
        while True:  # the held connections' closes are events the server sees; poll for them
            try:
                if srv.request("GET", "/metrics")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert _metric(srv, "fruitpipe_connections_refused_total", reason="max_connections") >= 30
    finally:
        for s in held:
            s.close()
        srv.stop()


def _png(mode: str, size: tuple[int, int]) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, (200, 30, 30, 255)[:len(mode)]).save(buf, "PNG")
    return buf.getvalue()


def test_decodes_are_admitted_by_their_estimated_bytes(trained) -> None:
    """Two decoders, a budget that holds one 2000 x 2000 RGBA decode but not two: the second waits for the first
    (the reserved bytes never pass the budget) although a decoder is free; a small image still goes by; an image
    estimated over the whole budget is 422 too_large at once (before: admitted by count, 4 x 64 Mpx RGBA at once
    cost 1,110 MB with 2 decoders)."""
    import threading

    from fruitpipe import images

    big = _png("RGBA", (2000, 2000))
    cost = images.decode_cost(big, 64_000_000, 224)
    assert 2000 * 2000 * 8 < cost < 2000 * 2000 * 10
    app = create_app(ServeSettings(output=str(trained["out"]), decoders=2, queue=8, decode_budget=cost + cost // 2))
    clf = app.state.classifier
    real = clf.photo_probabilities
    entered, release = threading.Semaphore(0), threading.Event()

    def held(data: bytes, max_pixels: int):
        if data == big:
            entered.release()
            assert release.wait(60)
        return real(data, max_pixels)

    clf.photo_probabilities = held
    srv = _Server(app)
    answers: list = []
    try:
        threads = [threading.Thread(target=lambda: answers.append(srv.predict(big))) for _ in range(2)]
        for t in threads:
            t.start()
        assert entered.acquire(timeout=60)  # one big decode runs
        deadline = time.monotonic() + 60
        while _metric(srv, "fruitpipe_uploads_admitted") < 2:  # observable: the second is in, waiting
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert _metric(srv, "fruitpipe_decode_bytes_reserved") == cost  # the first one's bytes alone
        assert not entered.acquire(blocking=False)  # a decoder is free, the budget is not
        small = _png("RGB", (64, 64))
        assert images.decode_cost(small, 64_000_000, 224) < cost // 2
        assert srv.predict(small)[0] == 200  # fits beside the first
        status, body = srv.predict(_png("RGBA", (4000, 4000)))  # estimated over the whole budget
        assert (status, body["error"]) == (422, "too_large") and "MiB" in body["detail"]
        release.set()
        for t in threads:
            t.join(60)
        assert [a[0] for a in answers] == [200, 200]
        assert _metric(srv, "fruitpipe_decode_bytes_reserved") == 0
    finally:
        release.set()
        srv.stop()
