"""Encoded image bytes -> an upright 8-bit RGB image, refusing anything unsafe before decoding it.

This module runs in the decode subprocesses (``worker.images.decode_pool``): it imports Pillow and numpy,
never torch.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from shared.errors import ErrorCode
from worker.errors import ImageInputError
from worker.images.structure import StructureLimits, check_structure

# Formats a photo arrives in. Everything else (EPS and other Ghostscript formats, ICO, PSD, ...) is
# refused before a parser for it is even tried.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # multi-picture JPEGs (MPO) open through JPEG

ImageFile.LOAD_TRUNCATED_IMAGES = False
# Pillow's own bomb guard runs at the same point as ours (after the header, before decoding) with a
# fixed limit; ours applies the configured limits and says which one was exceeded.
Image.MAX_IMAGE_PIXELS = None

# Bytes per pixel of an image held by Pillow (multi-band images are stored 4 bytes a pixel).
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_DEEP_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
# Rows converted at a time from deep modes: bounds the float/int temporaries to a few MB.
_CONVERT_ROWS = 256


@dataclass(frozen=True)
class ResizeRule:
    """The first resize of the model's image processor, to know the size an image is resized to."""

    shortest_edge: int | None = None
    longest_edge: int | None = None
    height: int | None = None
    width: int | None = None

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        if self.height and self.width:
            return self.width, self.height
        short, long = sorted((width, height))
        if self.shortest_edge:
            new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
            if self.longest_edge and new_long > self.longest_edge:
                new_short, new_long = int(self.longest_edge * new_short / new_long), self.longest_edge
        elif self.longest_edge:
            new_short, new_long = int(self.longest_edge * short / long), self.longest_edge
        else:
            return width, height
        return (new_short, new_long) if width <= height else (new_long, new_short)


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int
    max_pixels: int
    max_side: int
    jpeg_draft_size: tuple[int, int] | None = None
    # Unset: not checked (library use and tests of single rules); the worker always sets them.
    structure: StructureLimits | None = None
    max_decoded_bytes: int | None = None
    resize: ResizeRule | None = None

    def with_jpeg_draft(self, model_input: tuple[int, int]) -> DecodeLimits:
        """Let libjpeg decode at 1/2, 1/4 or 1/8 scale, but never below twice the model's input size."""
        side = 2 * max(model_input)
        return replace(self, jpeg_draft_size=(side, side))


def decode_image(data: bytes, limits: DecodeLimits) -> Image.Image:
    if not data:
        raise ImageInputError(ErrorCode.INVALID_IMAGE, "image data is empty")
    if len(data) > limits.max_bytes:
        raise ImageInputError(ErrorCode.IMAGE_TOO_LARGE, f"image is {len(data)} bytes, over the limit of {limits.max_bytes}")
    if limits.structure is not None:
        check_structure(data, limits.structure)
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        _check_dimensions(image.size, limits)
        frame_size = image.size
        if image.format == "JPEG" and limits.jpeg_draft_size is not None:
            image.draft("RGB", limits.jpeg_draft_size)
        _check_memory(image, frame_size, limits)
        image.load()
    except ImageInputError:
        raise
    except UnidentifiedImageError:
        raise ImageInputError(ErrorCode.INVALID_IMAGE, "not a supported image (JPEG, PNG, WebP, GIF, BMP or TIFF)") from None
    except MemoryError:
        raise _out_of_memory(limits) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as exc:
        if "memory" in str(exc).lower():  # libjpeg/libtiff report a failed allocation as an error
            raise _out_of_memory(limits) from None
        raise ImageInputError(ErrorCode.INVALID_IMAGE, f"image data is corrupt or truncated: {exc}") from None
    try:
        ImageOps.exif_transpose(image, in_place=True)
        return to_rgb(image)
    except MemoryError:
        raise _out_of_memory(limits) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageInputError(ErrorCode.INVALID_IMAGE, f"image cannot be converted to RGB: {exc}") from None


def _out_of_memory(limits: DecodeLimits) -> ImageInputError:
    budget = f" of {limits.max_decoded_bytes} bytes (IMBEDDINGS_DECODE_MAX_BYTES)" if limits.max_decoded_bytes else ""
    return ImageInputError(ErrorCode.IMAGE_TOO_LARGE, f"decoding the image needs more memory than its budget{budget}")


def _check_dimensions(size: tuple[int, int], limits: DecodeLimits) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageInputError(ErrorCode.INVALID_IMAGE, f"image has no pixels ({width}x{height})")
    if max(width, height) > limits.max_side:
        raise ImageInputError(ErrorCode.IMAGE_TOO_LARGE, f"image is {width}x{height}, a side over the limit of {limits.max_side} px")
    if width * height > limits.max_pixels:
        raise ImageInputError(ErrorCode.IMAGE_TOO_LARGE, f"image is {width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels}")


def decoded_bytes(image: Image.Image, frame_size: tuple[int, int]) -> int:
    """What decoding ``image`` (opened, not loaded) to an RGB array holds at its peak, from its header:
    Pillow's image, each conversion on the way to RGB, the RGB array, and libjpeg's coefficient
    buffer for a progressive JPEG (it keeps every coefficient of the frame until the last scan)."""
    pixels = image.width * image.height
    stored = pixels * _STORED_BYTES.get(image.mode, 4)
    total = stored + 3 * pixels
    if image.mode != "RGB":
        total += 4 * pixels
        if image.mode in _DEEP_MODES:
            total += stored + pixels  # the array it is scaled from, the 8-bit grayscale result
        if "A" in image.mode or "transparency" in image.info:
            total += 3 * 4 * pixels  # RGBA, the white background, the composite
    if "exif" in image.info:
        total += stored  # the copy an EXIF rotation makes (reading the tag itself may need the pixels)
    layers = getattr(image, "layer", None)
    if image.format == "JPEG" and image.info.get("progressive") and layers:
        h_max, v_max = max(layer[1] for layer in layers), max(layer[2] for layer in layers)
        samples = sum(layer[1] * layer[2] for layer in layers) / (h_max * v_max)
        total += int(frame_size[0] * frame_size[1] * samples * 2)
    return total


def _check_memory(image: Image.Image, frame_size: tuple[int, int], limits: DecodeLimits) -> None:
    if limits.max_decoded_bytes is None:
        return
    width, height = image.size
    needed = decoded_bytes(image, frame_size)
    if needed > limits.max_decoded_bytes:
        raise ImageInputError(
            ErrorCode.IMAGE_TOO_LARGE,
            f"image is {width}x{height} {image.mode}: decoding it needs about {needed} bytes, "
            f"over the budget of {limits.max_decoded_bytes} (IMBEDDINGS_DECODE_MAX_BYTES)",
        )
    if limits.resize is None:
        return
    # The model's own resize can make a thin image enormous (1x16384 at shortest edge 256 is
    # 256x4194304): checked here, before a pixel is decoded, as float32 RGB, its largest form.
    new_width, new_height = limits.resize.output_size(width, height)
    resized = new_width * new_height * 3 * 4
    if resized > limits.max_decoded_bytes:
        raise ImageInputError(
            ErrorCode.IMAGE_TOO_LARGE,
            f"image is {width}x{height}: the model's resize makes it {new_width}x{new_height}, {resized} bytes as float32, "
            f"over the budget of {limits.max_decoded_bytes} (IMBEDDINGS_DECODE_MAX_BYTES); its aspect ratio is too extreme",
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB the way Transformers' ``convert_to_rgb`` makes it: transparency composited on white.

    Images deeper than 8 bits are scaled to 8 bits first (Pillow's own conversion would clip them,
    turning most of a 16-bit photo white and a 0..1 float image black).
    """
    if image.mode in _DEEP_MODES:
        image = _scale_to_8bit(image)
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def deep_range(image: Image.Image) -> tuple[float, float]:
    """The range an image deeper than 8 bits is scaled from. Integers are 16-bit data in practice
    (PNG, TIFF): 0..65535. Floats have no convention, so the range their values reach decides:
    within 0..1 (the usual float convention), 0..255 (Pillow's own ``convert("F")``) or 0..65535.
    Values outside those (negative, wider than 16 bits) are stretched from their own min..max."""
    low, high = image.getextrema()
    tops = (1.0, 255.0, 65535.0) if image.mode == "F" else (65535.0,)
    for top in tops:
        if low >= 0 and high <= top:
            return 0.0, top
    return float(low), float(high) if high > low else float(low) + 1.0


def _scale_to_8bit(image: Image.Image) -> Image.Image:
    low, high = deep_range(image)
    values = np.asarray(image)
    out = np.empty(values.shape, dtype=np.uint8)
    scale = np.float32(255.0 / (high - low))
    for start in range(0, values.shape[0], _CONVERT_ROWS):
        rows = values[start : start + _CONVERT_ROWS].astype(np.float32)
        np.clip(np.rint((rows - np.float32(low)) * scale), 0, 255, out=rows)
        out[start : start + _CONVERT_ROWS] = rows
    return Image.fromarray(out)
