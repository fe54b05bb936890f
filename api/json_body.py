"""JSON request bodies, parsed so that no body can stall the event loop or flood memory.

Whole bodies (``bounded_json_route``, ``/v1/embeddings``) go through the four steps below; a job's
body, which may be a hundred times larger, is read as it arrives instead (``StreamedJSONObject``)
within the same bounds.

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
from typing import Any, TypeVar

import anyio
import ijson
import orjson
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

from api.errors import ApiError
from api.state import get_state
from shared.errors import ErrorCode
from shared.settings import Settings

M = TypeVar("M", bound=BaseModel)
# The C parser by name: ijson would fall back to its pure-Python one, far too slow for a job's body.
_IJSON = ijson.get_backend("yajl2_c")

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
def parse_slots() -> anyio.CapacityLimiter:
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


def max_json_values(max_inputs: int) -> int:
    return JSON_VALUES_PER_INPUT * max_inputs + JSON_VALUES_BASE


def _too_many_values(values: int, max_inputs: int) -> ApiError:
    return ApiError(
        ErrorCode.TOO_MANY_JSON_VALUES, f"request body holds more than {values} JSON values, more than any request of at most {max_inputs} images needs"
    )


def _too_many_inputs(count: int, max_inputs: int) -> ApiError:
    return ApiError(ErrorCode.TOO_MANY_INPUTS, f"input has {count} images, over the limit of {max_inputs} per request", param="input")


def _validation_error(error: ValidationError, where: Callable[[tuple[Any, ...]], tuple[Any, ...]] = lambda loc: loc) -> RequestValidationError:
    """pydantic's errors as FastAPI reports a body's, each located by ``where``."""
    return RequestValidationError([{**item, "loc": ("body", *where(item["loc"]))} for item in error.errors(include_url=False)])


def parse_request_json(body: bytes, max_inputs: int, model: type[BaseModel]) -> BaseModel:
    """The body as ``model``, or an ApiError / RequestValidationError saying why it is refused."""
    values = max_json_values(max_inputs)
    if json_values_over(body, values):
        raise _too_many_values(values, max_inputs)
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(ErrorCode.INVALID_JSON, f"request body is not valid JSON: {exc}") from None
    if isinstance(document, dict):
        inputs = document.get("input")
        if isinstance(inputs, list) and len(inputs) > max_inputs:
            raise _too_many_inputs(len(inputs), max_inputs)
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        raise _validation_error(exc) from None


_ABSENT = object()
_STARTS = ("start_map", "start_array")


class StreamedJSONObject:
    """A request body read as its bytes arrive, for bodies too large to hold (a job's): ijson's
    incremental parser (yajl, in C) turns the bytes into events, the items of one array member
    (``field``) are handed out one by one as each completes and are never gathered, and every other
    member is built and kept for ``validate`` when the body has ended.

    The bounds are those of a whole body, in the same order: at most ``max_json_values(max_inputs)``
    JSON values and keys (counted as they are parsed, so whatever is built stays within it), then valid
    JSON, then at most ``max_inputs`` items: past that, items are only counted, and the body is refused
    when it ends. Not thread-safe: one caller feeds it at a time.
    """

    def __init__(self, field: str, max_inputs: int) -> None:
        self.field = field
        self.max_inputs = max_inputs
        self.max_values = max_json_values(max_inputs)
        self.items = 0
        # The field's value when it is not an array (one image, or a wrong type that validation refuses).
        self.field_value: Any = _ABSENT
        self._array_seen = False
        self._members: dict[str, Any] = {}
        self._document: Any = _ABSENT  # the whole body, when it is not an object
        self._events = ijson.sendable_list()
        self._parser = _IJSON.basic_parse_coro(self._events, use_float=True)
        self._values = 0
        self._in_object = False
        self._in_array = False
        self._key = ""
        self._builder: ijson.ObjectBuilder | None = None
        self._builder_depth = 0
        self._building = ""

    def feed(self, data: bytes) -> list[tuple[int, Any]]:
        """The items ``data`` completed, with their positions; ApiError when the body is malformed or over a bound."""
        if not data:  # to the parser, an empty send is the end of the body
            return []
        try:
            self._parser.send(data)
        except ijson.JSONError as exc:
            raise _invalid_json(exc) from None
        return self._take()

    def end(self) -> list[tuple[int, Any]]:
        """The body is complete: the items its last bytes completed; ApiError when it stopped mid-value
        or held too many items."""
        try:
            self._parser.close()
        except ijson.JSONError as exc:
            raise _invalid_json(exc) from None
        items = self._take()
        if self.items > self.max_inputs:
            raise _too_many_inputs(self.items, self.max_inputs)
        return items

    def validate(self, model: type[M], probe: Any, positions: list[int]) -> M:
        """The body as ``model``, with ``probe`` standing in for the streamed field (its items were
        checked on the way); pydantic's errors at ``probe[k]`` are reported at ``positions[k]``, as they
        would have been for the whole body. RequestValidationError when it is refused."""
        if self._document is not _ABSENT:
            document = self._document
        else:
            present = self._array_seen or self.field_value is not _ABSENT
            document = {**self._members, self.field: probe} if present else self._members

        def where(loc: tuple[Any, ...]) -> tuple[Any, ...]:
            if len(loc) > 1 and loc[0] == self.field and isinstance(loc[1], int) and loc[1] < len(positions):
                return (loc[0], positions[loc[1]], *loc[2:])
            return loc

        try:
            return model.model_validate(document)
        except ValidationError as exc:
            raise _validation_error(exc, where) from None

    @property
    def array_seen(self) -> bool:
        """Whether the field was an array (its items were handed out)."""
        return self._array_seen

    def _take(self) -> list[tuple[int, Any]]:
        items: list[tuple[int, Any]] = []
        for event, value in self._events:
            if not event.startswith("end_"):
                self._values += 1
                if self._values > self.max_values:
                    raise _too_many_values(self.max_values, self.max_inputs)
            if self._builder is not None:
                self._builder.event(event, value)
                self._builder_depth += 1 if event in _STARTS else -1 if event.startswith("end_") else 0
                if self._builder_depth == 0:
                    self._built(self._builder.value, items)
                    self._builder = None
            elif self._in_array:
                if event == "end_array":
                    self._in_array = False
                else:
                    self._start("item", event, value, items)
            elif not self._in_object:
                if event == "start_map" and self._document is _ABSENT:
                    self._in_object = True
                else:
                    self._start("document", event, value, items)
            elif event == "map_key":
                self._key = value
            elif event == "end_map":
                self._in_object = False
            elif self._key != self.field:
                self._start("member", event, value, items)
            elif self._array_seen or self.field_value is not _ABSENT:
                raise ApiError(ErrorCode.INVALID_REQUEST, f"{self.field} appears twice in the request body", param=self.field)
            elif event == "start_array":
                self._array_seen = self._in_array = True
            else:
                self._start("field", event, value, items)
        del self._events[:]
        return items

    def _start(self, what: str, event: str, value: Any, items: list[tuple[int, Any]]) -> None:
        self._building = what
        if event in _STARTS:
            self._builder = ijson.ObjectBuilder()
            self._builder.event(event, value)
            self._builder_depth = 1
        else:
            self._built(value, items)

    def _built(self, value: Any, items: list[tuple[int, Any]]) -> None:
        if self._building == "item":
            self.items += 1
            if self.items <= self.max_inputs:
                items.append((self.items - 1, value))
        elif self._building == "field":
            self.field_value = value
        elif self._building == "member":
            self._members[self._key] = value
        else:
            self._document = value


def _invalid_json(exc: ijson.JSONError) -> ApiError:
    reason = exc.args[0] if exc.args else str(exc)
    text = reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)
    return ApiError(ErrorCode.INVALID_JSON, f"request body is not valid JSON: {text.strip().splitlines()[0] if text.strip() else 'malformed'}")


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


def require_json(request: Request) -> None:
    """For a route that reads its body itself: a body that is not declared JSON is refused as FastAPI
    refuses it (a request without Content-Type included)."""
    if not _is_json(request.headers.get("content-type", "")):
        message = "Input should be a valid dictionary or object to extract fields from"
        raise RequestValidationError([{"type": "model_attributes_type", "loc": ("body",), "msg": message, "input": None}])


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
                    document = await anyio.to_thread.run_sync(parse_request_json, body, limit, model, limiter=parse_slots())
                return await handle(_ParsedRequest(request, body, document))

            return parse_then_handle

    return BoundedJSONRoute
