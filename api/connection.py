"""The HTTP connection: uvicorn's httptools protocol, with a deadline and a size cap on request heads.

uvicorn closes a keep-alive connection that stays idle, but bounds neither how long a client may
take to send a request's line and headers nor how large they may grow: a client that trickles one
header byte every few seconds holds its connection forever, and httptools keeps an unfinished
header in memory however long it gets. Here each request's head must be complete within
``header_timeout_s`` (counted from the connection's opening for its first request, from the
request's first byte for later ones) and within ``max_header_bytes``; otherwise the client gets a
408 or 431 in OpenAI's error shape and the connection is closed.
"""

from __future__ import annotations

import asyncio
from asyncio import TimerHandle
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from api import metrics
from api.errors import ERRORS, error_json
from shared.errors import ErrorCode


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    header_timeout_s: float
    max_header_bytes: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: TimerHandle | None = None
        self._reading_head = False
        self._head_begun = False
        self._head_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_head()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._reading_head:  # a later request on a kept-alive connection; the first one's clock runs from the connection
            self._start_head()
        self._head_begun = True

    def on_headers_complete(self) -> None:
        self._end_head()
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        # Only a chunk that found the head unfinished and left it so is the head's alone; one in which
        # a request began may also hold the end of the one before it, so it is not counted (the cap
        # then holds to within one read).
        continuing = self._reading_head
        super().data_received(data)
        if continuing and self._reading_head and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > self.max_header_bytes:
                metrics.CONNECTIONS_REFUSED.labels("header_too_large").inc()
                self._refuse(ErrorCode.HEADERS_TOO_LARGE, f"request line and headers are larger than the limit of {self.max_header_bytes} bytes")

    def _start_head(self) -> None:
        self._reading_head = True
        self._head_begun = False
        self._head_bytes = 0
        self._head_deadline = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _end_head(self) -> None:
        self._reading_head = False
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if not self._reading_head or self.transport.is_closing():
            return
        metrics.CONNECTIONS_REFUSED.labels("header_timeout").inc()
        if not self._head_begun:
            # Nothing was asked (an idle or pre-opened connection): no answer is owed.
            self._end_head()
            self.transport.close()
            return
        self._refuse(ErrorCode.HEADER_TIMEOUT, f"request headers did not arrive within {self.header_timeout_s:g} s")

    def _refuse(self, code: ErrorCode, message: str) -> None:
        self._end_head()
        if self.cycle is not None and not self.cycle.response_complete:
            # A response to an earlier request is still going out on this connection: let it finish,
            # read nothing more, and close after it.
            self.cycle.keep_alive = False
            self.flow.pause_reading()
            return
        body = error_json(code, message)
        head = b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        self.transport.write(STATUS_LINE[ERRORS[code][0]] + head + body)
        self.transport.close()


def guarded_protocol(header_timeout_s: float, max_header_bytes: int) -> type[GuardedHttpToolsProtocol]:
    """The protocol class for ``uvicorn.run(http=...)``, which instantiates it per connection."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"header_timeout_s": header_timeout_s, "max_header_bytes": max_header_bytes})
