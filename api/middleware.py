"""ASGI middleware: request id, metrics and access log per request; request bodies read within size, time and memory limits."""

from __future__ import annotations

import logging
import re
import time
import uuid

import anyio
from prometheus_client import Counter, Histogram
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import metrics
from api.body_budget import BodyBudget
from api.errors import ERRORS, ApiError, error_json
from shared.errors import ErrorCode
from shared.logs import request_id_var

access_log = logging.getLogger("api.access")

_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# How long a refused upload is read and discarded after its 413 or 429, so the client can read the answer.
DRAIN_SECONDS = 10.0
# Refusals made while a body is still arriving end the connection: the rest of it is not worth reading.
CLOSE = {"Connection": "close"}


class ObservabilityMiddleware:
    """Per HTTP request: its id, its metrics and one access-log line.

    ``X-Request-ID`` is taken when it is a plain token, made otherwise, returned on the response and
    set for every log line of the request's handling (and passed on to the worker). Routes are
    labelled by template (``/v1/jobs/{job_id}``), models only once a handler accepted them
    (``request.state.model``), so label values stay few; likewise the caller's key id once the key
    was checked (``request.state.key_id``; the id, never the key). Query strings are never logged.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # Each label set's series, looked up once (the labels' values are few, see above): prometheus_client's
        # ``labels()`` validates and locks on every call.
        self._counts: dict[tuple[str, str, str, str, str], Counter] = {}
        self._latencies: dict[tuple[str, str], Histogram] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        supplied = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                supplied = value.decode("latin-1")
        request_id = supplied if _VALID_REQUEST_ID.match(supplied) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            seconds = time.perf_counter() - started
            route = _route_template(scope)
            model = scope["state"].get("model", "")
            key = scope["state"].get("key_id", "")
            self._series(route, scope["method"], model, str(status), key).inc()
            self._latency(route, scope["method"]).observe(seconds)
            if route != "/metrics":
                line = {"method": scope["method"], "path": scope["path"], "route": route, "status": status, "model": model, "key": key}
                access_log.info("request", extra={**line, "seconds": round(seconds, 4)})
            request_id_var.reset(token)

    def _series(self, route: str, method: str, model: str, status: str, key: str) -> Counter:
        labels = (route, method, model, status, key)
        series = self._counts.get(labels)
        if series is None:
            series = self._counts[labels] = metrics.REQUESTS.labels(*labels)
        return series

    def _latency(self, route: str, method: str) -> Histogram:
        labels = (route, method)
        series = self._latencies.get(labels)
        if series is None:
            series = self._latencies[labels] = metrics.LATENCY.labels(*labels)
        return series


def _route_template(scope: Scope) -> str:
    """The matched route as a template (``/v1/jobs/{job_id}``), from the path and its parameters."""
    if "route" not in scope:
        return "unmatched"
    path: str = scope["path"]
    for name, value in scope.get("path_params", {}).items():
        head, found, tail = path.rpartition(str(value))
        if found:
            path = f"{head}{{{name}}}{tail}"
    return path


class BodyLimitMiddleware:
    """Reads a request's body before the app sees it, within three limits, each with a readable answer.

    - size: at most ``max_bytes``, with or without Content-Length (413);
    - time: the whole body within ``timeout_s`` of the headers (408), so a trickling upload cannot
      hold its connection and its share of the budget for long;
    - memory: the bodies of all requests in flight together within ``budget`` (429 with
      ``Retry-After``). A declared Content-Length is reserved before any of the body is read, so
      hundreds of slow uploads announcing 60 MB each cannot buffer 60 MB each.

    The body is then replayed to the app (FastAPI would buffer it anyway), so a refused upload never
    reaches a route. Routes in ``streamed_paths`` (``POST /v1/jobs``) read their body as it arrives
    instead, under the same limits (see ``_stream``).

    A refusal sent while the client is still uploading would be lost to most clients if the server
    then closed the socket: closing with unread input makes the kernel reset the connection, and
    the client sees ECONNRESET instead of the answer. So the 413 or 429 is sent, the rest of the
    upload is read and thrown away (bounded in bytes and seconds), and only then is the response
    ended and the connection closed. A 408 goes to a client too slow to be worth that wait.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        budget: BodyBudget,
        timeout_s: float,
        drain_bytes: int | None = None,
        drain_s: float = DRAIN_SECONDS,
        streamed_paths: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.streamed_paths = streamed_paths
        self.max_bytes = max_bytes
        self.budget = budget
        self.timeout_s = timeout_s
        # Enough for an upload up to twice the limit, the usual size of an honest mistake.
        self.drain_bytes = 2 * max_bytes if drain_bytes is None else drain_bytes
        self.drain_s = drain_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared_text = headers.get(b"content-length")
        declared = int(declared_text) if declared_text is not None and declared_text.isdigit() else None
        # A client that asked to continue has sent nothing yet and sends nothing after a refusal.
        expects_continue = headers.get(b"expect", b"").lower() == b"100-continue"
        if declared is not None and declared > self.max_bytes:
            await self._too_large(receive, send, drain=not expects_continue)
            return
        if scope["path"] in self.streamed_paths:
            await self._stream(scope, receive, send, expects_continue)
            return
        with self.budget.hold() as held:
            if declared is not None and not held.grow_to(declared):
                await self._over_budget(declared, receive, send, drain=not expects_continue)
                return
            chunks: list[bytes] = []
            size = 0
            more = True
            refused: int | None = None
            with anyio.move_on_after(self.timeout_s) as deadline:
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    more = message.get("more_body", False)
                    if size > self.max_bytes:
                        refused = 413
                        break
                    if not held.grow_to(size):  # chunked, or more than was declared
                        refused = 429
                        break
                    chunks.append(chunk)
            if deadline.cancelled_caught:
                await self._refuse(send, ErrorCode.BODY_TIMEOUT, self._late_message(), {})
                return
            if refused == 413:
                await self._too_large(receive, send, drain=more)
                return
            if refused == 429:
                await self._over_budget(size, receive, send, drain=more)
                return
            body = b"".join(chunks)
            del chunks
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send)

    async def _stream(self, scope: Scope, receive: Receive, send: Send, expects_continue: bool) -> None:
        """The app reads the body as it arrives. The size and time limits hold chunk by chunk: a
        chunk past them raises the 413 or 408 into the route (which then undoes what it stored) and
        the error answer goes out as FastAPI's. The route accounts on ``request.state.body_hold``
        what it holds of the body at a time, against the same budget. Whatever the app answers
        before the body has been read (a refusal, a 401), the rest of the upload is read and thrown
        away before the answer ends, so the client can read it (see the class's note)."""
        deadline = anyio.current_time() + self.timeout_s
        size = 0
        read = False
        done = False
        late = False

        async def receive_within_limits() -> Message:
            nonlocal size, read, done, late
            if done:
                return await receive()  # after the body only the disconnect is left
            read = True
            with anyio.move_on_after(deadline - anyio.current_time()):
                message = await receive()
                if message["type"] == "http.disconnect":
                    return message
                size += len(message.get("body", b""))
                done = not message.get("more_body", False)
                if size > self.max_bytes:
                    raise ApiError(ErrorCode.REQUEST_TOO_LARGE, self._too_large_message(), headers=CLOSE)
                return message
            late = True
            raise ApiError(ErrorCode.BODY_TIMEOUT, self._late_message(), headers=CLOSE)

        async def send_after_the_body(message: Message) -> None:
            # A client that asked to continue and was never told to has sent nothing to read.
            unread = not done and not late and (read or not expects_continue)
            if message["type"] != "http.response.body" or message.get("more_body", False) or not unread:
                await send(message)
                return
            await send({**message, "more_body": True})
            await self._drain(receive)
            await send({"type": "http.response.body", "body": b""})

        with self.budget.hold() as held:
            scope["state"]["body_hold"] = held
            try:
                await self.app(scope, receive_within_limits, send_after_the_body)
            except ClientDisconnect:
                return

    def _too_large_message(self) -> str:
        return f"request body is larger than the limit of {self.max_bytes} bytes"

    def _late_message(self) -> str:
        return f"the request body did not arrive within {self.timeout_s:g} s of its headers"

    async def _too_large(self, receive: Receive, send: Send, drain: bool) -> None:
        await self._refuse(send, ErrorCode.REQUEST_TOO_LARGE, self._too_large_message(), {}, more=drain)
        if drain:
            await self._drain(receive)
            await send({"type": "http.response.body", "body": b""})

    async def _over_budget(self, size: int, receive: Receive, send: Send, drain: bool) -> None:
        refusal = self.budget.refusal(size)
        await self._refuse(send, refusal.code, refusal.message, {name.lower(): value for name, value in (refusal.headers or {}).items()}, more=drain)
        if drain:
            await self._drain(receive)
            await send({"type": "http.response.body", "body": b""})

    @staticmethod
    async def _refuse(send: Send, code: ErrorCode, message: str, headers: dict[str, str], more: bool = False) -> None:
        """Send a whole error answer; with ``more``, the response stays open (for a drain) until an empty last body."""
        body = error_json(code, message)
        head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        head += [(name.encode(), value.encode()) for name, value in headers.items()]
        await send({"type": "http.response.start", "status": ERRORS[code][0], "headers": head})
        # The whole answer goes out now (its length is declared); with more, the response ends after the drain.
        await send({"type": "http.response.body", "body": body, "more_body": more})

    async def _drain(self, receive: Receive) -> None:
        drained = 0
        with anyio.move_on_after(self.drain_s):
            while drained <= self.drain_bytes:
                message = await receive()
                if message["type"] == "http.disconnect" or not message.get("more_body", False):
                    return
                drained += len(message.get("body", b""))
