"""Encoded image bytes -> an upright 8-bit RGB image, refusing anything unsafe before decoding it."""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from worker.errors import ImageInputError

# Formats a photo arrives in. Everything else (EPS and other Ghostscript formats, ICO, PSD, ...) is
# refused before a parser for it is even tried.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # multi-picture JPEGs (MPO) open through JPEG

ImageFile.LOAD_TRUNCATED_IMAGES = False
# Pillow's own bomb guard runs at the same point as ours (after the header, before decoding) with a
# fixed limit; ours applies the configured limits and says which one was exceeded.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int
    max_pixels: int
    max_side: int
    jpeg_draft_size: tuple[int, int] | None = None

    def with_jpeg_draft(self, model_input: tuple[int, int]) -> DecodeLimits:
        """Let libjpeg decode at 1/2, 1/4 or 1/8 scale, but never below twice the model's input size."""
        side = 2 * max(model_input)
        return replace(self, jpeg_draft_size=(side, side))


def decode_image(data: bytes, limits: DecodeLimits) -> Image.Image:
    if not data:
        raise ImageInputError("invalid_image", "image data is empty")
    if len(data) > limits.max_bytes:
        raise ImageInputError("image_too_large", f"image is {len(data)} bytes, over the limit of {limits.max_bytes}")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        _check_dimensions(image.size, limits)
        if image.format == "JPEG" and limits.jpeg_draft_size is not None:
            image.draft("RGB", limits.jpeg_draft_size)
        image.load()
    except ImageInputError:
        raise
    except UnidentifiedImageError:
        raise ImageInputError("invalid_image", "not a supported image (JPEG, PNG, WebP, GIF, BMP or TIFF)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as exc:
        raise ImageInputError("invalid_image", f"image data is corrupt or truncated: {exc}") from None
    except MemoryError:
        raise ImageInputError("image_too_large", "image needs too much memory to decode") from None
    try:
        return to_rgb(ImageOps.exif_transpose(image))
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageInputError("invalid_image", f"image cannot be converted to RGB: {exc}") from None


def _check_dimensions(size: tuple[int, int], limits: DecodeLimits) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageInputError("invalid_image", f"image has no pixels ({width}x{height})")
    if max(width, height) > limits.max_side:
        raise ImageInputError("image_too_large", f"image is {width}x{height}, a side over the limit of {limits.max_side} px")
    if width * height > limits.max_pixels:
        raise ImageInputError("image_too_large", f"image is {width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels}")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB the way Transformers' ``convert_to_rgb`` makes it: transparency composited on white.

    Integer images deeper than 8 bits (16-bit PNG/TIFF) are scaled to 8 bits first; Pillow's own
    conversion would clip them, turning most of a 16-bit photo white.
    """
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        image = _scale_to_8bit(image)
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8))
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _scale_to_8bit(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    # Mode "I" holds 16-bit data from PNG/TIFF in practice; wider values are clipped to 16 bits.
    scaled = np.clip(values, 0, 65535) / 257.0
    return Image.fromarray(np.round(scaled).astype(np.uint8))
