"""Where an image's bytes come from: the request itself (base64) or a URL."""

from __future__ import annotations

import base64
import binascii

from shared.protocol import ImageRef
from worker.errors import ImageInputError
from worker.fetch import FetchLimits, fetch_url


def decode_base64(payload: str, max_bytes: int) -> bytes:
    # base64 grows data by 4/3: refuse oversize payloads before allocating their decoded form.
    if len(payload) // 4 * 3 > max_bytes + 3:
        raise ImageInputError("image_too_large", f"image is about {len(payload) // 4 * 3} bytes, over the limit of {max_bytes}")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageInputError("invalid_base64", f"image is not valid base64: {exc}") from None


def read_image_bytes(ref: ImageRef, fetch_limits: FetchLimits, max_bytes: int) -> bytes:
    if ref.kind == "base64":
        return decode_base64(ref.data, max_bytes)
    return fetch_url(ref.data, fetch_limits)
