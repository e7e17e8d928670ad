"""uvicorn, bounded: a request's headers must be complete within `header_timeout` seconds of the connection opening
(or of the previous response on a kept-alive one), else 408 and the connection is closed; past `max_connections`
open connections a new one gets 503 and is closed at once. uvicorn has neither (its issue #157): without them,
sockets that send half a header hold a file descriptor each, forever. Interrupted by SIGINT or SIGTERM, the server
finishes the requests in flight and the command exits 130, as the other fruitpipe commands do."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

_408 = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
_503 = (b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n")
#: fruitpipe's exit status for a command stopped by SIGINT or SIGTERM (README, "Resuming").
INTERRUPTED = 130


def bounded(protocol: type[asyncio.Protocol], header_timeout: float, max_connections: int) -> type[Any]:
    """`protocol` (uvicorn's h11 or httptools one) with the header deadline and the connection cap."""

    class Bounded(protocol):  # type: ignore[valid-type, misc]
        """A connection with a deadline for each request's headers, refused past the connection cap."""

        _fp_timer: asyncio.TimerHandle | None = None
        _fp_seen: Any = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning("connection refused: %d open (--max-connections %d)", len(self.connections) - 1,
                            max_connections)
                transport.write(_503)
                transport.close()
                return
            self._fp_arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._fp_started()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._fp_started()  # a pipelined request may have begun inside
            cycle = getattr(self, "cycle", None)
            if not self.transport.is_closing() and (cycle is None or cycle.response_complete):
                self._fp_arm()  # the next request's headers, on a kept-alive connection

        def connection_lost(self, exc: Exception | None) -> None:
            self._fp_cancel()
            super().connection_lost(exc)

        def _fp_arm(self) -> None:
            self._fp_cancel()
            self._fp_seen = getattr(self, "cycle", None)
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
    # that the connections the cap lets in are all served.
    return uvicorn.Config(app, host=host, port=port, limit_concurrency=max_connections + 1,
                          http=bounded(protocol or http_protocol(), header_timeout, max_connections), **kwargs)


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
