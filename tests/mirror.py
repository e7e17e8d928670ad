"""A loopback stand-in for the public download host (raw.githubusercontent.com): ../shared's files under the paths
they have on the real host, on a real HTTP server on 127.0.0.1, with faults a test can script per path."""

from __future__ import annotations

import http.server
import sys
import threading
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from conftest import MODELS, SAMPLE, SHARED

WEIGHTS_DIR = "JonathanCMitchell/mobilenet_v2_keras/8ab6f54432a37061766a94cf0388908e72cb12cb/weights"
SAMPLE_DIR = "P-Swain/Fruits-Recognition-CSL2050-Project/b78d3e26c547cd841f67c5e54e4fe7233d4687f9/data/fruits-360"
REAL_DIR = "marcusklasson/GroceryStoreDataset/fc80ba90f803d79d0383df52c5a4ac5de99ff6fc"
GROCERY = SHARED / "data" / "grocery-store"
#: What the mirror serves: host folder -> local folder (the Grocery Store repository's LICENSE is the one file of
#: its root the project fetches).
ROOTS = {WEIGHTS_DIR: MODELS / "mobilenet_v2_keras_weights" / "weights", SAMPLE_DIR: SAMPLE,
         f"{REAL_DIR}/dataset": GROCERY / "dataset"}
FILES = {f"{REAL_DIR}/LICENSE": GROCERY / "LICENSE-GroceryStoreDataset.txt"}

#: A fault answers one request instead of the file: (status, headers, body); status 200 with a body replaces it.
Fault = tuple[int, dict[str, str], bytes]
#: A fault header (not sent) that makes the mirror send the body one byte every that many seconds.
DRIP = "X-Test-Drip-Seconds"


@dataclass
class Mirror:
    """The running mirror: its base URL, the requests it answered, and faults to give (path -> queue)."""

    url: str
    requests: Counter[str] = field(default_factory=Counter)
    faults: dict[str, list[Fault]] = field(default_factory=dict)
    #: Called with each path before it is answered (a test may stop the run there).
    on_request: Callable[[str], None] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Seconds between the bytes of every file answered (0: at once): a mirror that drips.
    drip: float = 0.0
    #: Set when the mirror stops: a dripping answer ends.
    closed: threading.Event = field(default_factory=threading.Event)
    #: Errors the mirror met answering (not a client that hung up): the block fails with the first.
    errors: list[BaseException | None] = field(default_factory=list)

    def fail(self, host_path: str, *faults: Fault) -> None:
        """Answer the next requests of `host_path` with `faults`, in order, then serve the file again."""
        with self.lock:
            self.faults.setdefault(host_path, []).extend(faults)


def _local(host_path: str) -> Path | None:
    if host_path in FILES:
        return FILES[host_path]
    for prefix, folder in ROOTS.items():
        if host_path.startswith(prefix + "/"):
            rel = host_path[len(prefix) + 1 :]
            if ".." in rel.split("/"):
                return None
            return folder / rel
    return None


@contextmanager
def serve_mirror() -> Iterator[Mirror]:
    """Start the mirror on a free loopback port for the duration of the block."""
    mirror = Mirror(url="")

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 (the http.server API)
            host_path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
            with mirror.lock:
                mirror.requests[host_path] += 1
                queue = mirror.faults.get(host_path)
                fault = queue.pop(0) if queue else None
            if mirror.on_request is not None:
                mirror.on_request(host_path)
            if fault is None:
                local = _local(host_path)
                if local is None or not local.is_file():
                    fault = (404, {}, b"Not Found")
                else:
                    fault = (200, {}, local.read_bytes())
            status, headers, body = fault
            headers = dict(headers)
            drip = float(headers.pop(DRIP, 0)) or (mirror.drip if status == 200 else 0.0)
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not drip:
                self.wfile.write(body)
                return
            self.wfile.flush()
            for i in range(len(body)):  # a mirror that sends one byte every `drip` seconds
                if mirror.closed.wait(drip):
                    return
                try:
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                except OSError:  # the client gave up: what the test wants
                    return

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: object, client_address: object) -> None:
            # socketserver prints the traceback to stderr, the stderr of the command under test (the mirror runs in
            # its process): a client that hung up mid-answer (a download stopped because another file failed) is
            # what a real host sees without a word; any other error fails the test when the block ends.
            exc = sys.exc_info()[1]
            if not isinstance(exc, ConnectionError):
                mirror.errors.append(exc)

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    mirror.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield mirror
    finally:
        mirror.closed.set()
        server.shutdown()
        server.server_close()
    assert not mirror.errors, f"the mirror failed on a request: {mirror.errors[0]!r}"
