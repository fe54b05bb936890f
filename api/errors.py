"""Errors in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``, one handler each."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from kombu.exceptions import OperationalError
from redis.exceptions import OutOfMemoryError, RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.responses import JSONBytesResponse

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable", 504: "timeout", 507: "insufficient_storage"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None, type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers


def error_response(error: ApiError) -> JSONBytesResponse:
    body = {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}
    return JSONBytesResponse(body, status_code=error.status, headers=error.headers)


def _location(loc: tuple[object, ...]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    text = ""
    for part in parts:
        text += f"[{part}]" if part.isdigit() else (f".{part}" if text else part)
    return text or "body"


async def _api_error(_: Request, exc: ApiError) -> JSONBytesResponse:
    return error_response(exc)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONBytesResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    param = _location(tuple(first.get("loc", ())))
    message = f"{param}: {first.get('msg', 'invalid value')}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return error_response(ApiError(400, message, code="invalid_request", param=param))


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONBytesResponse:
    return error_response(ApiError(exc.status_code, str(exc.detail), code={404: "not_found", 405: "method_not_allowed"}.get(exc.status_code), headers=getattr(exc, "headers", None)))


def _redis_full(exc: BaseException | None) -> bool:
    """An OOM refusal, raised by redis-py itself or wrapped by kombu while publishing."""
    while exc is not None:
        if isinstance(exc, OutOfMemoryError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


async def _queue_error(_: Request, exc: Exception) -> JSONBytesResponse:
    if _redis_full(exc):
        log.warning("redis full", extra={"error": type(exc).__name__})
        return error_response(ApiError(507, "Redis is full (it reached its maxmemory) and refused to store this work; nothing of it was kept; retry later", code="redis_full", headers={"Retry-After": "10"}))
    log.warning("redis unavailable", extra={"error": type(exc).__name__})
    return error_response(ApiError(503, "the queue (Redis) is unreachable; retry shortly", code="queue_unavailable", headers={"Retry-After": "2"}))


async def _unexpected(_: Request, exc: Exception) -> JSONBytesResponse:
    log.exception("unhandled error")
    return error_response(ApiError(500, "internal error; it has been logged", code="internal_error", type="server_error"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RedisError, _queue_error)
    app.add_exception_handler(OperationalError, _queue_error)
    app.add_exception_handler(Exception, _unexpected)
