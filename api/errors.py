"""Errors in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: the one table from an
error code to its HTTP status and type, the builders of every error body, and one handler each."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from kombu.exceptions import OperationalError
from pydantic import BaseModel
from redis.exceptions import OutOfMemoryError, RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.responses import JSONBytesResponse
from shared.errors import ErrorCode
from shared.protocol import ItemResult

log = logging.getLogger(__name__)

INVALID = "invalid_request_error"
SERVER = "server_error"
# The only place a code gets its HTTP status and OpenAI error type.
ERRORS: dict[ErrorCode, tuple[int, str]] = {
    ErrorCode.INVALID_REQUEST: (400, INVALID),
    ErrorCode.INVALID_JSON: (400, INVALID),
    ErrorCode.TOO_MANY_JSON_VALUES: (400, INVALID),
    ErrorCode.TOO_MANY_INPUTS: (400, INVALID),
    ErrorCode.INVALID_DIMENSIONS: (400, INVALID),
    ErrorCode.REQUEST_EXCEEDS_TIMEOUT: (400, INVALID),
    ErrorCode.EXCEEDS_KEY_QUOTA: (400, INVALID),
    ErrorCode.INVALID_PURPOSE: (400, INVALID),
    ErrorCode.INVALID_ENDPOINT: (400, INVALID),
    ErrorCode.INVALID_COMPLETION_WINDOW: (400, INVALID),
    ErrorCode.INVALID_FILE: (400, INVALID),
    ErrorCode.DUPLICATE_CUSTOM_ID: (400, INVALID),
    ErrorCode.BATCH_CANCELLED: (400, INVALID),
    ErrorCode.INVALID_IMAGE: (400, INVALID),
    ErrorCode.INVALID_BASE64: (400, INVALID),
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: (400, INVALID),
    ErrorCode.UNSUPPORTED_IMAGE: (400, INVALID),
    ErrorCode.IMAGE_TOO_LARGE: (400, INVALID),
    ErrorCode.TOO_MANY_SEGMENTS: (400, INVALID),
    ErrorCode.TOO_MANY_SCANS: (400, INVALID),
    ErrorCode.METADATA_TOO_LARGE: (400, INVALID),
    ErrorCode.DECODE_BUDGET_EXCEEDED: (400, INVALID),
    ErrorCode.DECODER_UNAVAILABLE: (400, INVALID),
    ErrorCode.INVALID_URL: (400, INVALID),
    ErrorCode.URL_FETCH_FAILED: (400, INVALID),
    ErrorCode.URL_FETCH_TIMEOUT: (400, INVALID),
    ErrorCode.URL_HTTP_ERROR: (400, INVALID),
    ErrorCode.URL_TOO_MANY_REDIRECTS: (400, INVALID),
    ErrorCode.URL_FORBIDDEN_ADDRESS: (400, INVALID),
    ErrorCode.DEADLINE_EXCEEDED: (400, INVALID),
    ErrorCode.REQUEST_WITHDRAWN: (400, INVALID),
    ErrorCode.WORKER_STOPPING: (400, INVALID),
    ErrorCode.INPUT_EXPIRED: (500, SERVER),
    ErrorCode.INFERENCE_FAILED: (500, SERVER),
    ErrorCode.WORKER_ERROR: (500, SERVER),
    ErrorCode.CHUNK_FAILED: (500, SERVER),
    ErrorCode.INTERNAL_ERROR: (500, SERVER),
    ErrorCode.MISSING_API_KEY: (401, "authentication_error"),
    ErrorCode.INVALID_API_KEY: (401, "authentication_error"),
    ErrorCode.NOT_FOUND: (404, "not_found_error"),
    ErrorCode.MODEL_NOT_FOUND: (404, "not_found_error"),
    ErrorCode.JOB_NOT_FOUND: (404, "not_found_error"),
    ErrorCode.JOB_EXPIRED: (404, "not_found_error"),
    ErrorCode.JOB_RESULTS_DELETED: (404, "not_found_error"),
    ErrorCode.FILE_NOT_FOUND: (404, "not_found_error"),
    ErrorCode.BATCH_NOT_FOUND: (404, "not_found_error"),
    ErrorCode.METHOD_NOT_ALLOWED: (405, INVALID),
    ErrorCode.HEADER_TIMEOUT: (408, INVALID),
    ErrorCode.BODY_TIMEOUT: (408, INVALID),
    ErrorCode.HEADERS_TOO_LARGE: (431, INVALID),
    ErrorCode.REQUEST_TOO_LARGE: (413, INVALID),
    ErrorCode.CLIENT_CLOSED_REQUEST: (499, INVALID),
    ErrorCode.QUEUE_FULL: (429, "rate_limit_error"),
    ErrorCode.KEY_QUOTA_EXCEEDED: (429, "rate_limit_error"),
    ErrorCode.TOO_MANY_BYTES_IN_FLIGHT: (429, "rate_limit_error"),
    ErrorCode.MODEL_NOT_SERVED: (503, "service_unavailable"),
    ErrorCode.QUEUE_UNAVAILABLE: (503, "service_unavailable"),
    ErrorCode.TIMEOUT: (504, "timeout"),
    ErrorCode.REDIS_FULL: (507, "insufficient_storage"),
}


# An image's error inside results: the same table, except that a worker handed an image of a model it
# does not load is the service's failure (500), where the API finding no worker at all is a 503.
ITEM_ERRORS: dict[ErrorCode, tuple[int, str]] = {**ERRORS, ErrorCode.MODEL_NOT_SERVED: (500, SERVER)}


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "Bad request or bad image (the message names the input index)",
        401: "Missing or wrong API key",
        404: "Unknown model, or no such job for this key",
        408: "The request body did not arrive in time",
        413: "Request body too large",
        429: "Queue full, the API key's quota of queued images used up, or too many request bodies in flight; retry after the Retry-After header",
        503: "No worker serves the model, or Redis is unreachable",
        504: "The wait for a worker ran out",
        507: "Redis has no room for this work (its memory budget or maxmemory); retry after the Retry-After header",
    }.items()
}


class ApiError(Exception):
    """A refusal: its code gives the status and type (``ERRORS``), the message says what was wrong, ``param`` where."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        table: dict[ErrorCode, tuple[int, str]] = ERRORS,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers
        self.status, self.type = table[code]


def error_body(code: ErrorCode, message: str, param: str | None = None, error_type: str | None = None) -> dict[str, Any]:
    return {"message": message, "type": error_type or ERRORS[code][1], "param": param, "code": code}


def error_json(code: ErrorCode, message: str) -> bytes:
    """The whole answer body, for the layers below FastAPI (the connection and the body reader)."""
    return orjson.dumps({"error": error_body(code, message)})


def error_response(error: ApiError) -> JSONBytesResponse:
    return JSONBytesResponse({"error": error_body(error.code, error.message, error.param, error.type)}, status_code=error.status, headers=error.headers)


def item_error(index: int, code: ErrorCode, message: str) -> dict[str, Any]:
    """One failed item among results (a job's page, a batch's output): the error without ``param``."""
    return {"index": index, "error": {"message": message, "type": ITEM_ERRORS[code][1], "code": code}}


def item_error_body(result: ItemResult) -> dict[str, Any]:
    assert result.error is not None
    return item_error(result.index, result.error.code, result.error.message)


def first_failure(results: list[ItemResult]) -> ApiError | None:
    """The error a synchronous request gets when any image failed: the first one's, naming its position."""
    failed = [r for r in results if r.error is not None]
    if not failed:
        return None
    first = failed[0]
    assert first.error is not None
    more = f" ({len(failed) - 1} more input{'s' if len(failed) > 2 else ''} failed too)" if len(failed) > 1 else ""
    return ApiError(first.error.code, f"input[{first.index}]: {first.error.message}{more}", param=f"input[{first.index}]", table=ITEM_ERRORS)


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
    return error_response(ApiError(ErrorCode.INVALID_REQUEST, message, param=param))


_ROUTING_CODES = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONBytesResponse:
    headers = getattr(exc, "headers", None)
    code = _ROUTING_CODES.get(exc.status_code)
    if code is not None:
        return error_response(ApiError(code, str(exc.detail), headers=headers))
    # Raised by Starlette itself (a form it cannot parse): its status stands, with no code of ours.
    body = {"message": str(exc.detail), "type": SERVER if exc.status_code >= 500 else INVALID, "param": None, "code": None}
    return JSONBytesResponse({"error": body}, status_code=exc.status_code, headers=headers)


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
        message = "Redis is full (it reached its maxmemory) and refused to store this work; nothing of it was kept; retry later"
        return error_response(ApiError(ErrorCode.REDIS_FULL, message, headers={"Retry-After": "10"}))
    log.warning("redis unavailable", extra={"error": type(exc).__name__})
    return error_response(ApiError(ErrorCode.QUEUE_UNAVAILABLE, "the queue (Redis) is unreachable; retry shortly", headers={"Retry-After": "2"}))


async def _unexpected(_: Request, exc: Exception) -> JSONBytesResponse:
    log.exception("unhandled error")
    return error_response(ApiError(ErrorCode.INTERNAL_ERROR, "internal error; it has been logged"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RedisError, _queue_error)
    app.add_exception_handler(OperationalError, _queue_error)
    app.add_exception_handler(Exception, _unexpected)
