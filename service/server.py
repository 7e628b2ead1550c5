"""uvicorn's HTTP protocols with a time limit on a request's headers (``mqsa serve`` uses them).

uvicorn times out idle keep-alive connections but not a connection that sends its
request headers slowly, or part of them and then nothing: a thousand such clients
hold a thousand connections (a slowloris). An ASGI app cannot help, it only sees a
request once its headers are in; so the limit lives here. A connection gets
``MQSA_HEADER_TIMEOUT_SECONDS`` from its start, and again after each response,
to deliver a request's headers; otherwise it is closed. The body's limit is the
app's (``service/edge.py``: 408 after ``MQSA_BODY_TIMEOUT_SECONDS``).

Both of uvicorn's HTTP/1.1 protocols are covered: httptools (uvicorn[standard],
the faster) and h11; :func:`protocol_class` picks the one uvicorn's "auto" would.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from mqsa.service.settings import load_settings


class HeaderDeadline:
    """Mixin for a uvicorn HTTP protocol: close a connection whose request headers are late."""

    header_timeout_seconds: float | None = None  # read from the settings at the first connection
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)  # type: ignore[misc]

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        cycle = getattr(self, "cycle", None)
        idle = cycle is None or cycle.response_complete  # no pipelined request already under way
        if idle and not self.transport.is_closing():  # type: ignore[attr-defined]
            self._arm_header_timer()

    def _headers_in(self) -> None:
        self._cancel_header_timer()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        if HeaderDeadline.header_timeout_seconds is None:
            HeaderDeadline.header_timeout_seconds = load_settings().header_timeout_seconds
        loop = asyncio.get_running_loop()
        self._header_timer = loop.call_later(HeaderDeadline.header_timeout_seconds, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        transport = self.transport  # type: ignore[attr-defined]
        if not transport.is_closing():
            transport.close()


class H11WithDeadline(HeaderDeadline, H11Protocol):
    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:  # a request's headers were parsed into a new cycle
            self._headers_in()


try:  # uvicorn[standard] brings httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - the image and the tests have it
    HttpToolsProtocol = None

if HttpToolsProtocol is not None:

    class HttpToolsWithDeadline(HeaderDeadline, HttpToolsProtocol):
        def on_headers_complete(self) -> None:
            self._headers_in()
            super().on_headers_complete()


def protocol_class() -> type[asyncio.Protocol]:
    """httptools with the header deadline when installed (as uvicorn's "auto" picks), else h11.

    Module-level classes, so that uvicorn can hand them to worker processes.
    """
    return H11WithDeadline if HttpToolsProtocol is None else HttpToolsWithDeadline
