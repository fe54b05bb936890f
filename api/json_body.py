"""JSON request bodies, parsed so that no body can stall the event loop or flood memory.

FastAPI would parse a body with the standard library on the event loop and then build a pydantic
model for every item of ``input``, however many there are: 4 MiB holding 1.4 million empty
objects took 30 s of the loop and 2.6 GB. Here, before FastAPI sees a body:

1. a cheap count bounds how many JSON values it can hold: at most ``JSON_VALUES_PER_INPUT`` per
   image the route accepts (and ``JSON_VALUES_BASE`` for the rest of the request), so parsing can
   only ever build that many objects;
2. orjson parses it;
3. ``input`` is counted against the route's limit before any per-item model exists;
4. the route's body model is validated (for a large job, the costliest step).

All four run in a worker thread unless the body is small. FastAPI is then handed the validated
model, which pydantic passes through without validating it again, so the route, its OpenAPI
description and the error handlers stay what they were.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine
from functools import cache
from typing import Any

import anyio
import orjson
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

from api.errors import ApiError
from api.state import get_state
from shared.errors import ErrorCode
from shared.settings import Settings

# A request names each image in at most 10 JSON values and separators
# (`{"type":"image","image_url":"..."},`) and says the rest (model, pooling, ...) in under 64:
# both bounds leave room for what a generous client adds (whitespace costs nothing).
JSON_VALUES_PER_INPUT = 12
JSON_VALUES_BASE = 256
# Bodies this small (a couple of hundred URLs, a thumbnail) parse and validate within about a millisecond: on the
# event loop they cost less than the hop to a thread, whose parse would hold the GIL about as long.
INLINE_PARSE_BYTES = 16 * 1024
# Every value or key but the first of its container follows one of these; the first follows its
# container's opening bracket (or, for an object's values, the colon).
_SEPARATORS = (b",", b":", b"[", b"{")
_STRING = re.compile(rb'"[^"]*"')


@cache
def _parse_slots() -> anyio.CapacityLimiter:
    """Large bodies are parsed two at a time: the parse holds the GIL, so more threads would not
    finish sooner, and this bounds the memory of parses in progress."""
    return anyio.CapacityLimiter(2)


def json_values_over(body: bytes, limit: int) -> bool:
    """Whether this JSON text can hold more than ``limit`` values and keys, counting what parsing
    it would build (malformed text is left to the parser to refuse).

    Separators are counted over the whole text first: strings seldom hold any (base64 none, a data
    URI two), so that bound is usually enough. Only when it is not are strings taken out and the
    separators counted again, exactly.
    """
    if len(body) <= limit:  # every value takes at least a byte
        return False
    if sum(body.count(c) for c in _SEPARATORS) <= limit:
        return False
    text = body
    if b"\\" in text:
        # Escapes can neither end a string nor start one: without them, every quote delimits one.
        text = text.replace(b"\\\\", b"").replace(b'\\"', b"")
    strings = text.count(b'"') // 2
    if strings > limit + 1:
        return True
    outside = _STRING.sub(b"", text)
    return sum(outside.count(c) for c in _SEPARATORS) > limit


def parse_request_json(body: bytes, max_inputs: int, model: type[BaseModel]) -> BaseModel:
    """The body as ``model``, or an ApiError / RequestValidationError saying why it is refused."""
    values = JSON_VALUES_PER_INPUT * max_inputs + JSON_VALUES_BASE
    if json_values_over(body, values):
        raise ApiError(
            ErrorCode.TOO_MANY_JSON_VALUES,
            f"request body holds more than {values} JSON values, more than any request of at most {max_inputs} images needs",
        )
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(ErrorCode.INVALID_JSON, f"request body is not valid JSON: {exc}") from None
    if isinstance(document, dict):
        inputs = document.get("input")
        if isinstance(inputs, list) and len(inputs) > max_inputs:
            raise ApiError(ErrorCode.TOO_MANY_INPUTS, f"input has {len(inputs)} images, over the limit of {max_inputs} per request", param="input")
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        raise RequestValidationError([{**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)]) from None


class _ParsedRequest(Request):
    """The request as FastAPI's handler sees it: body already read, parsed and validated."""

    def __init__(self, request: Request, body: bytes, document: BaseModel) -> None:
        super().__init__(request.scope, request.receive)
        self._raw_body = body
        self._document = document

    async def body(self) -> bytes:
        return self._raw_body

    async def json(self) -> BaseModel:
        return self._document


def _is_json(content_type: str) -> bool:
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def bounded_json_route(max_inputs: Callable[[Settings], int]) -> type[APIRoute]:
    """A route class (``APIRouter(route_class=...)``) whose JSON bodies are parsed as above, with
    ``max_inputs(settings)`` images allowed per request."""

    class BoundedJSONRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handle = super().get_route_handler()
            if self.body_field is None:
                return handle
            model = self.body_field.field_info.annotation
            assert isinstance(model, type) and issubclass(model, BaseModel), f"{self.path}: the body must be one pydantic model"

            async def parse_then_handle(request: Request) -> Response:
                body = await request.body()
                if not body or not _is_json(request.headers.get("content-type", "")):
                    return await handle(request)  # FastAPI says what is wrong with it
                limit = max_inputs(get_state(request).settings)
                if len(body) <= INLINE_PARSE_BYTES:
                    document = parse_request_json(body, limit, model)
                else:
                    document = await anyio.to_thread.run_sync(parse_request_json, body, limit, model, limiter=_parse_slots())
                return await handle(_ParsedRequest(request, body, document))

            return parse_then_handle

    return BoundedJSONRoute
