"""What one hostile or unlucky client can cost `fruitpipe serve`, with its limits ("after") and without them
("before": the same app on uvicorn's own protocol, no header deadline, no connection cap, no upload budget), in
one run on the same cores:

- peak RSS of one worst-case upload (a 142 KB 16-bit 7999x7999 PNG) and of 8 at once (VmHWM of the server);
- memory held by 100 uploads that send 14 MiB each, then stall (VmRSS while they hang);
- how long a connection that sent half a header is kept;
- the throughput of normal uploads (the shared sample's Test photos, 8 concurrent), before/after ratio.

    python bench/serve_limits.py OUT [--json bench/results/serve-limits.json]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("FRUITPIPE_SHARED", ROOT.parent / "shared")) / "data" / "fruits360-sample"
MIB = 1024 * 1024


def _child(mode: str, out: str, port: int) -> None:
    """The server process: the app on the bounded protocol (after) or uvicorn's own, no budget (before)."""
    import uvicorn

    from fruitpipe.serve import ServeSettings, create_app
    from fruitpipe.serve.server import serve

    limited = mode == "after"
    app = create_app(ServeSettings(output=out, max_buffered=256 * MIB if limited else 1 << 60))
    if limited:
        serve(app, host="127.0.0.1", port=port, header_timeout=5.0, max_connections=256, log_level="warning",
              access_log=False, timeout_keep_alive=5)
    else:
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, timeout_keep_alive=5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _form(data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"p.png\"\r\n\r\n").encode() \
        + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _post(port: int, data: bytes) -> int:
    body, ctype = _form(data)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/predict", body, {"Content-Type": ctype})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp.status


class Server:
    """A server process in `mode`, ready when /health answers."""

    def __init__(self, mode: str, out: Path) -> None:
        self.port = _free_port()
        self.proc = subprocess.Popen([sys.executable, __file__, "--child", mode, str(out), str(self.port)],
                                     stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"server did not start: {self.proc.stderr.read().decode()}") from None
                time.sleep(0.2)

    def mib(self, field: str) -> float:
        return _status_kib(self.proc.pid, field) / 1024

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def worst_png() -> bytes:
    """A constant 16-bit grayscale PNG of 7999x7999: 142 KB that passes every size and pixel limit."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("I;16", (7999, 7999), 1000).save(buf, "PNG")
    return buf.getvalue()


def peak(mode: str, out: Path, photo: bytes, worst: bytes, at_once: int) -> float:
    """The server's VmHWM above its warm baseline when `at_once` worst-case uploads arrive together."""
    srv = Server(mode, out)
    try:
        for _ in range(5):
            _post(srv.port, photo)  # warm: the model and the decoders have run once
        base = srv.mib("VmHWM")
        with ThreadPoolExecutor(at_once) as pool:
            statuses = list(pool.map(lambda _: _post(srv.port, worst), range(at_once)))
        return round(srv.mib("VmHWM") - base, 1) if all(s in (200, 422) for s in statuses) else float("nan")
    finally:
        srv.stop()


def stalled(mode: str, out: Path, photo: bytes, n: int = 100, each: int = 14 * MIB) -> dict[str, float]:
    """VmRSS above baseline while `n` uploads have sent `each` bytes of a 15 MiB body and stopped."""
    srv = Server(mode, out)
    socks: list[socket.socket] = []
    try:
        _post(srv.port, photo)
        base = srv.mib("VmRSS")
        head_len = 15 * MIB - 1024
        chunk = b"\xff" * MIB
        refused = 0
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", srv.port))
            s.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                      f"Content-Length: {head_len}\r\n\r\n".encode())
            s.settimeout(30)
            try:
                for _ in range(each // MIB):
                    s.sendall(chunk)
            except OSError:
                pass  # the server closed it (answered) while it was sending
            socks.append(s)
        time.sleep(2)  # let the server read what was sent (the stall itself: no event to wait for)
        held = srv.mib("VmRSS") - base
        for s in socks:  # which of them the server already answered (503 busy), without waiting
            s.setblocking(False)
            try:
                refused += s.recv(12).startswith(b"HTTP/1.1 503")
            except BlockingIOError:
                pass
        return {"held_mib": round(held, 1), "answered_503": refused}
    finally:
        for s in socks:
            s.close()
        srv.stop()


def half_header(mode: str, out: Path, cap_s: float = 30.0) -> float | None:
    """Seconds until the server closes a connection that sent half a header (None: still open after cap_s)."""
    srv = Server(mode, out)
    try:
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
        t0 = time.perf_counter()
        s.settimeout(cap_s)
        try:
            while s.recv(4096):
                pass
            return round(time.perf_counter() - t0, 2)
        except TimeoutError:
            return None
        finally:
            s.close()
    finally:
        srv.stop()


def throughput(out: Path, photos: list[bytes], requests: int, rounds: int = 5) -> dict[str, object]:
    """Requests/s of normal uploads at 8 concurrent, before and after in alternating rounds (the VM's own drift
    hits both); the median of each and their ratio."""
    import statistics

    got: dict[str, list[float]] = {"before": [], "after": []}
    for r in range(rounds):
        for mode in (("before", "after") if r % 2 == 0 else ("after", "before")):
            srv = Server(mode, out)
            try:
                for p in photos[:20]:
                    _post(srv.port, p)
                batch = [photos[i % len(photos)] for i in range(requests)]
                t0 = time.perf_counter()
                with ThreadPoolExecutor(8) as pool:
                    statuses = list(pool.map(lambda d: _post(srv.port, d), batch))
                assert all(s == 200 for s in statuses), set(statuses)
                got[mode].append(round(requests / (time.perf_counter() - t0), 1))
            finally:
                srv.stop()
    before, after = statistics.median(got["before"]), statistics.median(got["after"])
    return {"rounds": got, "before_median_per_s": before, "after_median_per_s": after,
            "ratio": round(after / before, 3)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="an OUTPUT with classifier/fruit_classifier.onnx")
    parser.add_argument("--requests", type=int, default=400, help="requests per throughput round")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--throughput-only", action="store_true", help="only the before/after throughput rounds")
    args = parser.parse_args()
    photos = [p.read_bytes() for p in sorted((SAMPLE / "Test").rglob("*.jpg"))]
    worst = worst_png()
    res: dict[str, object] = {"cores": os.cpu_count(), "worst_upload_bytes": len(worst), "modes": {}}
    for mode in () if args.throughput_only else ("before", "after"):
        res["modes"][mode] = {  # type: ignore[index]
            "peak_one_worst_mib": peak(mode, args.out, photos[0], worst, 1),
            "peak_eight_worst_mib": peak(mode, args.out, photos[0], worst, 8),
            "stalled_100x14mib": stalled(mode, args.out, photos[0]),
            "half_header_kept_s": half_header(mode, args.out),
        }
    res["throughput_8_concurrent"] = throughput(args.out, photos, args.requests)
    print(json.dumps(res, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
