"""Turn the request's ``input`` into images, refusing malformed ones by index.

Only the form is checked here (URL syntax, data URI header, base64 alphabet, size); base64 is
decoded once, here, and the raw bytes travel on. Fetching and decoding the image happen in the
worker, which reports image problems per index the same way.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass

from api.errors import ApiError
from api.schemas import ImageObject
from shared.errors import ErrorCode
from shared.protocol import ItemError
from shared.urls import InvalidUrl, split_http_url

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.IGNORECASE)
MAX_URL_LENGTH = 8192
_URL_SAFE = str.maketrans("-_", "+/")


@dataclass(frozen=True)
class ParsedInput:
    """The API's reading of one item of ``input``: a URL for the worker to fetch, the image's bytes,
    or why it was refused (a job's lenient parse). ``api.sync_requests`` and ``api.async_jobs`` turn it
    into the ``ImageRef`` that crosses the queue."""

    index: int
    url: str | None = None
    data: bytes | None = None
    error: ItemError | None = None


def _bad(index: int, message: str, code: ErrorCode = ErrorCode.INVALID_IMAGE) -> ApiError:
    return ApiError(code, f"input[{index}]: {message}", param=f"input[{index}]")


def _standard_base64(payload: str) -> str:
    """Many clients send the URL-safe alphabet (``-_``) or drop the ``=`` padding: both are accepted.
    Mixing the two alphabets in one string is still refused, as is any other character."""
    if "-" in payload or "_" in payload:
        if "+" in payload or "/" in payload:
            raise ValueError("mixes the standard (+/) and URL-safe (-_) base64 alphabets")
        payload = payload.translate(_URL_SAFE)
    return payload + "=" * (-len(payload) % 4) if len(payload) % 4 != 1 else payload


def _base64_ref(index: int, payload: str, max_image_bytes: int) -> ParsedInput:
    payload = "".join(payload.split())  # line-wrapped base64 is common; str.split is the fast way out
    if not payload:
        raise _bad(index, "image data is empty")
    if len(payload) // 4 * 3 > max_image_bytes + 3:
        raise _bad(index, f"image is about {len(payload) // 4 * 3} bytes, over the limit of {max_image_bytes} bytes", ErrorCode.IMAGE_TOO_LARGE)
    try:
        data = binascii.a2b_base64(_standard_base64(payload), strict_mode=True)
    except ValueError as exc:  # binascii.Error, or non-ASCII text
        raise _bad(index, f"not a URL, data URI or valid base64 ({exc})", ErrorCode.INVALID_BASE64) from None
    if len(data) > max_image_bytes:
        raise _bad(index, f"image is {len(data)} bytes, over the limit of {max_image_bytes} bytes", ErrorCode.IMAGE_TOO_LARGE)
    return ParsedInput(index=index, data=data)


def parse_one(index: int, value: str, max_image_bytes: int) -> ParsedInput:
    text = value.strip()
    if not text:
        raise _bad(index, "input is empty")
    if text[:5].lower() == "data:":
        match = _DATA_URI.match(text)
        if not match:
            raise _bad(index, "malformed data URI (expected data:image/<type>;base64,<data>)")
        mime = (match.group("mime") or "").lower()
        if mime and not mime.startswith("image/"):
            raise _bad(index, f"data URI media type {mime!r} is not an image", ErrorCode.UNSUPPORTED_MEDIA_TYPE)
        if not match.group("b64"):
            raise _bad(index, "data URI must be base64-encoded (;base64,)")
        return _base64_ref(index, text[match.end() :], max_image_bytes)
    if _SCHEME.match(text) and "://" in text[:16]:
        if len(text) > MAX_URL_LENGTH:
            raise _bad(index, f"URL is longer than {MAX_URL_LENGTH} characters", ErrorCode.INVALID_URL)
        try:
            split_http_url(text)
        except InvalidUrl as exc:
            raise _bad(index, str(exc), ErrorCode.INVALID_URL) from None
        return ParsedInput(index=index, url=text)
    return _base64_ref(index, text, max_image_bytes)


def parse_inputs(raw: str | list[str | ImageObject], max_inputs: int, max_image_bytes: int) -> list[ParsedInput]:
    """A request's images: the first malformed input refuses the whole request with a 400."""
    values = [raw] if isinstance(raw, str) else raw
    if not values:
        raise ApiError(ErrorCode.INVALID_REQUEST, "input is empty: give at least one image", param="input")
    if len(values) > max_inputs:
        raise ApiError(ErrorCode.TOO_MANY_INPUTS, f"input has {len(values)} images, over the limit of {max_inputs} per request", param="input")
    return [parse_item(index, value, max_image_bytes) for index, value in enumerate(values)]


def parse_job_item(index: int, value: str | ImageObject, max_image_bytes: int) -> ParsedInput:
    """One image of a job: a malformed one becomes that item's error, and the rest of the job goes ahead."""
    try:
        return parse_item(index, value, max_image_bytes)
    except ApiError as exc:
        return ParsedInput(index=index, error=ItemError(message=exc.message, code=exc.code))


def parse_item(index: int, value: str | ImageObject, max_image_bytes: int) -> ParsedInput:
    if not isinstance(value, ImageObject):
        return parse_one(index, value, max_image_bytes)
    if value.image_base64 is None:
        return parse_one(index, value.image_url or "", max_image_bytes)
    text = value.image_base64.strip()
    return parse_one(index, text, max_image_bytes) if text[:5].lower() == "data:" else _base64_ref(index, text, max_image_bytes)
