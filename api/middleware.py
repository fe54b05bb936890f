"""ASGI middleware: request id, metrics and access log per request; a hard cap on body size."""

from __future__ import annotations

import logging
import re
import time
import uuid

import anyio
import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import metrics
from shared.logs import request_id_var

access_log = logging.getLogger("api.access")

_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# How long an oversize upload is read and discarded after its 413, so the client can read the answer.
DRAIN_SECONDS = 10.0


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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        supplied = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
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
            metrics.REQUESTS.labels(route, scope["method"], model, str(status), key).inc()
            metrics.LATENCY.labels(route, scope["method"]).observe(seconds)
            if route != "/metrics":
                access_log.info("request", extra={"method": scope["method"], "path": scope["path"], "route": route, "status": status, "model": model, "key": key, "seconds": round(seconds, 4)})
            request_id_var.reset(token)


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
    """Reads at most ``max_bytes`` of a body, with or without Content-Length, then answers 413.

    The body is read here in full (FastAPI would buffer it anyway) and replayed to the app, so an
    oversize chunked upload is refused without the route ever seeing it.

    A 413 sent while the client is still uploading would be lost to most clients if the server
    then closed the socket: closing with unread input makes the kernel reset the connection, and
    the client sees ECONNRESET instead of the answer. So the 413 is sent, the rest of the upload
    is read and thrown away (bounded in bytes and seconds), and only then is the response ended
    and the connection closed.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, drain_bytes: int | None = None, drain_s: float = DRAIN_SECONDS) -> None:
        self.app = app
        self.max_bytes = max_bytes
        # Enough for an upload up to twice the limit, the usual size of an honest mistake.
        self.drain_bytes = 2 * max_bytes if drain_bytes is None else drain_bytes
        self.drain_s = drain_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            # A client that asked to continue has sent nothing yet and sends nothing after a 413.
            expects_continue = headers.get(b"expect", b"").lower() == b"100-continue"
            await self._too_large(receive, send, drain=not expects_continue)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(receive, send, drain=message.get("more_body", False))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, receive: Receive, send: Send, drain: bool) -> None:
        body = orjson.dumps({"error": {"message": f"request body is larger than the limit of {self.max_bytes} bytes", "type": "invalid_request_error", "param": None, "code": "request_too_large"}})
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
        # The whole answer goes out now (its length is declared); the response ends after the drain.
        await send({"type": "http.response.body", "body": body, "more_body": True})
        if drain:
            await self._drain(receive)
        await send({"type": "http.response.body", "body": b""})

    async def _drain(self, receive: Receive) -> None:
        drained = 0
        with anyio.move_on_after(self.drain_s):
            while drained <= self.drain_bytes:
                message = await receive()
                if message["type"] == "http.disconnect" or not message.get("more_body", False):
                    return
                drained += len(message.get("body", b""))
