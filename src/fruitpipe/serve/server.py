"""uvicorn, bounded: a request's headers must be complete within `header_timeout` seconds of the connection opening
(or of the previous response on a kept-alive one), else 408 and the connection is closed, and within
MAX_HEADER_BYTES, else 431; past `max_connections` open connections a new one gets 503 and is closed at once; a
connection may queue MAX_PIPELINED requests behind the one being answered (past them the rest of its read is not
parsed: the queued ones are answered, then the connection closes). uvicorn has none of
these (its issue #157): without them, sockets that send half a header hold a file descriptor each, forever, 40 MiB
of headers cost 700 MB, and 1 MiB of pipelined GETs 96 MB. Refusals are counted (the app's `count_refused`) and
logged once a minute, not once each. Interrupted by SIGINT or SIGTERM, the server finishes the requests in flight,
closes the uploads still arriving (503), and the command exits 130, as the other fruitpipe commands do."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

_408 = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
_503 = (b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n")
_431 = b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
#: Largest request line + headers, bytes: nginx's default (4 x 8 KiB buffers) is 32 KiB, a phone's POST about 1 KiB.
MAX_HEADER_BYTES = 32 * 1024
#: Requests one connection may queue behind the one being answered (HTTP/1.1 pipelining; browsers send none).
MAX_PIPELINED = 8
#: Seconds a refused connection's further bytes are read and dropped before it closes (nginx's lingering close).
LINGER = 2.0
#: Seconds between two log lines about refused connections (each is counted in /metrics).
SUMMARY_EVERY = 60.0
#: fruitpipe's exit status for a command stopped by SIGINT or SIGTERM (README, "Resuming").
INTERRUPTED = 130


class Refusals:
    """Refused connections, by reason: each counted (`count`, e.g. a Prometheus counter's), one WARNING per minute
    at most (745 lines for 1,000 refused sockets before)."""

    def __init__(self, count: Callable[[str], None] | None = None) -> None:
        self.count = count
        self.pending: dict[str, int] = {}
        self.last = -SUMMARY_EVERY
        self.timer: asyncio.TimerHandle | None = None

    def add(self, loop: asyncio.AbstractEventLoop, reason: str, detail: str) -> None:
        if self.count is not None:
            self.count(reason)
        self.pending[reason] = self.pending.get(reason, 0) + 1
        if loop.time() - self.last >= SUMMARY_EVERY:
            self.flush(loop, detail)
        elif self.timer is None:
            self.timer = loop.call_at(self.last + SUMMARY_EVERY, self.flush, loop, "")

    def flush(self, loop: asyncio.AbstractEventLoop, detail: str) -> None:
        self.timer = None
        if self.pending:
            said = ", ".join(f"{n} {reason}" for reason, n in sorted(self.pending.items()))
            log.warning("connections refused: %s%s (fruitpipe_connections_refused_total in /metrics)", said,
                        f"; {detail}" if detail else f" in the last {SUMMARY_EVERY:g} s")
            self.pending.clear()
            self.last = loop.time()


class HeldBytes:
    """Request bytes held in memory by requests not yet answered, against one limit (--max-buffered-mb): upload
    bodies (the app counts them as they arrive) and the requests a connection queued by pipelining (counted here,
    by their request line and headers). The event loop's thread only: no lock."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        """Count `n` more bytes if they fit under the limit; False (nothing counted) if not."""
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        """Stop counting `n` bytes."""
        self.used -= n


class _PipelineFull(Exception):
    """Raised inside httptools' parser to stop it at the pipelining bound."""


#: True while uvicorn handles the parse stop that _PipelineFull causes (the event loop's thread only).
_quiet = [False]


def _not_our_stop(record: logging.LogRecord) -> bool:
    """uvicorn logs "Invalid HTTP request received." for any parser stop: not for the pipelining bound's."""
    return not _quiet[0]


def bounded(protocol: type[asyncio.Protocol], header_timeout: float, max_connections: int,
            refusals: Refusals | None = None, held: HeldBytes | None = None) -> type[Any]:
    """`protocol` (uvicorn's h11 or httptools one) with the header deadline and size limit, the connection cap, the
    pipelining bound (a count, and the queued requests' bytes in `held`, the memory budget uploads count in too)
    and the shutdown of uploads still arriving."""
    refused = refusals or Refusals()
    budget = held or HeldBytes(1 << 62)
    uvicorn_log = logging.getLogger("uvicorn.error")
    if _not_our_stop not in uvicorn_log.filters:
        uvicorn_log.addFilter(_not_our_stop)

    class Bounded(protocol):  # type: ignore[valid-type, misc]
        """A connection with a deadline and a size limit for each request's headers, refused past the cap."""

        _fp_timer: asyncio.TimerHandle | None = None
        _fp_seen: Any = None
        _fp_header_bytes = 0
        _fp_tail = b""
        _fp_drop = False
        _fp_queued: dict[int, int] | None = None  # id(cycle) -> bytes counted in `held`, while it waits

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                refused.add(self.loop, "max_connections", f"{len(self.connections) - 1} open "
                            f"(--max-connections {max_connections})")
                transport.write(_503)
                transport.close()
                return
            # The request cycles close through this one: an answer given before the upload's end lingers.
            self.transport = _Lingering(transport, self)
            self._fp_arm()

        def data_received(self, data: bytes) -> None:
            if self._fp_drop:
                return  # the parser stopped at the pipelining bound: the connection closes after the queued answers
            if self._fp_timer is not None and self._fp_header_bytes + len(data) > MAX_HEADER_BYTES:
                # Still waiting for this request's headers: do they end within the limit?
                room = MAX_HEADER_BYTES - self._fp_header_bytes
                if b"\r\n\r\n" not in self._fp_tail + data[:max(room, 0)]:
                    self._fp_refuse(_431, "header_too_large", f"request headers over {MAX_HEADER_BYTES} bytes")
                    return
            if self._fp_timer is not None:
                self._fp_header_bytes += len(data)
                self._fp_tail = data[-3:]
            super().data_received(data)
            self._fp_started()

        def on_headers_complete(self) -> None:  # httptools' callback (h11 queues pipelined requests itself)
            pipeline = getattr(self, "pipeline", ())
            size = len(getattr(self, "url", b"")) + sum(len(k) + len(v) + 4 for k, v in getattr(self, "headers", ()))
            queued = bool(pipeline) or (getattr(self, "cycle", None) is not None and not self.cycle.response_complete)
            over = len(pipeline) >= MAX_PIPELINED
            if queued and not over and not budget.take(size):
                over = True
                refused.add(self.loop, "pipelined", f"queued requests past the memory budget ({budget.limit} bytes)")
            elif over:
                refused.add(self.loop, "pipelined", f"over {MAX_PIPELINED} requests queued on one connection")
            if over:
                # Stop parsing this read: httptools would turn all of it into queued requests. The requests already
                # queued are answered, then the connection closes; the client sends the rest again (RFC 9112 9.3.2).
                self._fp_drop = True
                _quiet[0] = True
                (pipeline[0][0] if pipeline else self.cycle).keep_alive = False
                raise _PipelineFull
            super().on_headers_complete()
            if queued:  # this request waits behind another: its bytes stay counted until it is taken up
                if self._fp_queued is None:
                    self._fp_queued = {}
                self._fp_queued[id(self.pipeline[0][0] if self.pipeline else self.cycle)] = size

        def send_400_response(self, msg: str) -> None:  # httptools' answer to a parse error: ours is not one
            _quiet[0] = False
            if not self._fp_drop:
                super().send_400_response(msg)

        def on_response_complete(self) -> None:
            waiting = {id(c) for c, _ in getattr(self, "pipeline", ())}
            super().on_response_complete()
            if self._fp_queued:  # the queued request uvicorn took up now is no longer waiting
                for taken in waiting - {id(c) for c, _ in getattr(self, "pipeline", ())}:
                    budget.give(self._fp_queued.pop(taken, 0))
            self._fp_started()  # a pipelined request may have begun inside
            cycle = getattr(self, "cycle", None)
            if not self.transport.is_closing() and (cycle is None or cycle.response_complete):
                self._fp_arm()  # the next request's headers, on a kept-alive connection

        def shutdown(self) -> None:
            """Graceful shutdown: a request whose upload is still arriving gets 503 and its connection closes,
            rather than keeping a stopped server alive for as long as its client drips bytes."""
            cycle = getattr(self, "cycle", None)
            if cycle is not None and not cycle.response_complete and not cycle.response_started \
                    and cycle.more_body and not self.transport.is_closing():
                self._fp_close_with(_503)
                return
            super().shutdown()

        def connection_lost(self, exc: Exception | None) -> None:
            self._fp_cancel()
            if self._fp_queued:  # requests that were never taken up
                budget.give(sum(self._fp_queued.values()))
                self._fp_queued = None
            super().connection_lost(exc)

        def _fp_refuse(self, response: bytes, reason: str, detail: str) -> None:
            refused.add(self.loop, reason, detail)
            self._fp_close_with(response)

        def _fp_close_with(self, response: bytes) -> None:
            """Answer `response` and close, lingering: the client's bytes still coming are read and dropped for up
            to LINGER seconds, so that its kernel does not reset the connection before it reads the answer."""
            self.transport.write(response)
            self._fp_linger()

        def _fp_linger(self) -> None:
            """Close after the answer written, lingering (RFC 9112 9.6): the write side is shut, so the client
            reads the answer and the end, while its bytes still coming are read and dropped until it stops sending
            or for LINGER seconds, so that its kernel does not reset the connection and lose the answer."""
            self._fp_cancel()
            self._fp_drop = True  # data_received drops what comes
            proxy = self.transport if isinstance(self.transport, _Lingering) else None
            transport = proxy.real if proxy else self.transport
            if transport.is_closing() or (proxy and proxy.lingering):
                return
            if not transport.can_write_eof():
                transport.close()
                return
            if proxy:
                proxy.lingering = True
            transport.write_eof()
            self.flow.resume_reading()  # uvicorn paused reading while the unread body filled its buffer
            self.loop.call_later(LINGER, transport.close)

        def _fp_arm(self) -> None:
            self._fp_cancel()
            self._fp_seen = getattr(self, "cycle", None)
            self._fp_header_bytes = 0
            self._fp_tail = b""
            self._fp_timer = self.loop.call_later(header_timeout, self._fp_expired)

        def _fp_cancel(self) -> None:
            if self._fp_timer is not None:
                self._fp_timer.cancel()
                self._fp_timer = None

        def _fp_started(self) -> None:
            """Headers complete: the protocol made a new request cycle since the deadline was armed."""
            cycle = getattr(self, "cycle", None)
            if self._fp_timer is not None and cycle is not None and cycle is not self._fp_seen:
                self._fp_cancel()

        def _fp_expired(self) -> None:
            self._fp_timer = None
            if not self.transport.is_closing():
                log.info("connection closed: no complete request headers within %g s", header_timeout)
                self.transport.write(_408)
                self.transport.close()

    Bounded.__name__ = f"Bounded{protocol.__name__}"
    return Bounded


class _Lingering:
    """A connection's transport as uvicorn's request cycles see it: the app may answer before the upload's end (413,
    408, 503 with Connection: close); closing then at once would leave the client's bytes unread, and the kernel
    would answer them with a reset that can arrive before the client reads the answer. Such a close lingers
    instead; every other call goes to the real transport."""

    def __init__(self, real: Any, protocol: Any) -> None:
        self.real = real
        self.protocol = protocol
        self.lingering = False

    def close(self) -> None:
        cycle = getattr(self.protocol, "cycle", None)
        if cycle is not None and cycle.more_body and not self.real.is_closing():
            self.protocol._fp_linger()  # a request whose body is still arriving
        else:
            self.real.close()

    def is_closing(self) -> bool:
        return self.lingering or self.real.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def http_protocol() -> type[asyncio.Protocol]:
    """The protocol uvicorn's "auto" picks: httptools when installed (uvicorn[standard]), else h11."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol


def config(app: Any, *, host: str, port: int, header_timeout: float, max_connections: int,
           protocol: type[asyncio.Protocol] | None = None, **kwargs: Any) -> Any:
    """uvicorn's Config for `app` with the bounded protocol (`protocol`: h11's or httptools', default as "auto")."""
    import uvicorn

    # uvicorn answers 503 to a request once `limit_concurrency` connections are open: one more than the cap, so
    # that the connections the cap lets in are all served. h11 refuses headers past its own limit with 400: set
    # above ours, so that both protocols answer 431 at MAX_HEADER_BYTES.
    state = getattr(app, "state", None)
    refusals = Refusals(getattr(state, "count_refused", None))
    return uvicorn.Config(app, host=host, port=port, limit_concurrency=max_connections + 1,
                          h11_max_incomplete_event_size=2 * MAX_HEADER_BYTES + 65536,
                          http=bounded(protocol or http_protocol(), header_timeout, max_connections, refusals,
                                       getattr(state, "held_bytes", None)),
                          **kwargs)


def serve(app: Any, *, host: str, port: int, header_timeout: float, max_connections: int, **kwargs: Any) -> int:
    """Run `app` until SIGINT or SIGTERM; returns the exit status (130 when stopped by either)."""
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's Server, returning a signal it caught as the exit status instead of raising it again after
        the shutdown (which made SIGINT exit 0 and SIGTERM 143)."""

        stopped_by: list[int] = []

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                yield
                self.stopped_by = list(self._captured_signals)
                self._captured_signals.clear()

    server = Server(config(app, host=host, port=port, header_timeout=header_timeout,
                           max_connections=max_connections, **kwargs))
    server.run()
    if server.stopped_by:
        log.info("stopped by %s after finishing the requests in flight", signal.Signals(server.stopped_by[0]).name)
        return INTERRUPTED
    return 0
