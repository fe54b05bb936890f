"""Structural checks on an image's bytes, before any parser or decoder of Pillow sees them.

Some files cost a decoder far more than their size suggests, and the cost lies in their structure,
not in their pixels: a progressive JPEG makes libjpeg run a pass over every block for each of its
scans; Pillow walks JPEG markers, PNG chunks and TIFF tags one by one in Python; a TIFF tile is
allocated whole, however small the image. These walks read only the framing (lengths and tags),
stop at the first limit crossed, and raise an ``ImageInputError`` naming the limit.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from shared.errors import ErrorCode
from worker.errors import ImageInputError


@dataclass(frozen=True)
class StructureLimits:
    max_segments: int  # JPEG markers, PNG chunks, TIFF directory entries
    max_metadata_bytes: int  # JPEG APPn/COM payloads, PNG ancillary chunk payloads
    jpeg_max_scans: int


def check_structure(data: bytes, limits: StructureLimits) -> None:
    """Raise ``ImageInputError`` when the framing of ``data`` crosses a limit; unknown formats pass
    (Pillow refuses them with its own message)."""
    if data.startswith(b"\xff\xd8"):
        _check_jpeg(data, limits)
    elif data.startswith(b"\x89PNG\r\n\x1a\n"):
        _check_png(data, limits)
    elif data.startswith(b"BM"):
        _check_bmp(data)
    elif data[:4] in (b"II*\x00", b"MM\x00*"):
        _check_tiff(data, limits)


# In entropy-coded data 0xFF is followed by 0x00 (stuffing) or a restart marker; anything else is
# the next marker (a run of 0xFF fill bytes matches at its last 0xFF).
_JPEG_MARKER_IN_SCAN = re.compile(rb"\xff[\x01-\xcf\xd8-\xfe]")
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RST0-7 carry no length


def _check_jpeg(data: bytes, limits: StructureLimits) -> None:
    segments = scans = metadata = 0
    position = 2
    end = len(data)
    while position + 4 <= end:
        if data[position] != 0xFF:
            return  # garbage between segments: libjpeg reports it
        marker = data[position + 1]
        if marker == 0xFF:
            position += 1
            continue
        if marker == 0xD9:  # EOI
            return
        if marker in _JPEG_STANDALONE:
            position += 2
            continue
        segments += 1
        if segments > limits.max_segments:
            raise ImageInputError(
                ErrorCode.TOO_MANY_SEGMENTS,
                f"JPEG has more than {limits.max_segments} marker segments (limit IMBEDDINGS_MAX_IMAGE_SEGMENTS)",
            )
        length = struct.unpack_from(">H", data, position + 2)[0]
        if 0xE0 <= marker <= 0xEF or marker == 0xFE:
            metadata += length - 2
            if metadata > limits.max_metadata_bytes:
                raise ImageInputError(
                    ErrorCode.METADATA_TOO_LARGE,
                    f"JPEG has more than {limits.max_metadata_bytes} bytes of APPn/COM metadata (limit IMBEDDINGS_MAX_METADATA_BYTES)",
                )
        position += 2 + length
        if marker == 0xDA:  # SOS: its entropy-coded data runs to the next marker
            scans += 1
            if scans > limits.jpeg_max_scans:
                raise ImageInputError(
                    ErrorCode.TOO_MANY_SCANS,
                    f"progressive JPEG has more than {limits.jpeg_max_scans} scans (limit IMBEDDINGS_JPEG_MAX_SCANS)",
                )
            found = _JPEG_MARKER_IN_SCAN.search(data, position)
            if found is None:
                return
            position = found.start()


_PNG_FRAME_CHUNKS = frozenset({b"acTL", b"fcTL", b"fdAT"})  # APNG frames: pixels, not metadata (only the first frame is decoded)


def _check_png(data: bytes, limits: StructureLimits) -> None:
    segments = metadata = 0
    position = 8
    end = len(data)
    while position + 8 <= end:
        length, kind = struct.unpack_from(">I4s", data, position)
        segments += 1
        if segments > limits.max_segments:
            raise ImageInputError(ErrorCode.TOO_MANY_SEGMENTS, f"PNG has more than {limits.max_segments} chunks (limit IMBEDDINGS_MAX_IMAGE_SEGMENTS)")
        if kind[0] & 0x20 and kind not in _PNG_FRAME_CHUNKS:  # lower-case first letter: ancillary (text, ICC, unknown, ...)
            metadata += length
            if metadata > limits.max_metadata_bytes:
                raise ImageInputError(
                    ErrorCode.METADATA_TOO_LARGE,
                    f"PNG has more than {limits.max_metadata_bytes} bytes of ancillary chunks (limit IMBEDDINGS_MAX_METADATA_BYTES)",
                )
        if kind == b"IEND":
            return
        position += 12 + length


_BMP_RLE = {1: "RLE8", 2: "RLE4"}


def _check_bmp(data: bytes) -> None:
    if len(data) < 34:
        return
    header_size, compression = struct.unpack_from("<I", data, 14)[0], struct.unpack_from("<I", data, 30)[0]
    # Pillow decodes RLE bitmaps in pure Python (seconds of CPU for a few MB); photos are not sent that way.
    if header_size >= 40 and compression in _BMP_RLE:
        raise ImageInputError(ErrorCode.UNSUPPORTED_IMAGE, f"{_BMP_RLE[compression]}-compressed BMP is not accepted; send the image as PNG or uncompressed BMP")


_TIFF_WIDTH, _TIFF_LENGTH, _TIFF_TILE_WIDTH, _TIFF_TILE_LENGTH = 256, 257, 322, 323


def _check_tiff(data: bytes, limits: StructureLimits) -> None:
    order = "<" if data[:2] == b"II" else ">"
    directory = struct.unpack_from(order + "I", data, 4)[0]
    if directory + 2 > len(data):
        return
    count = struct.unpack_from(order + "H", data, directory)[0]
    if count > limits.max_segments:
        raise ImageInputError(
            ErrorCode.TOO_MANY_SEGMENTS, f"TIFF directory has {count} entries, over the limit of {limits.max_segments} (IMBEDDINGS_MAX_IMAGE_SEGMENTS)"
        )
    values: dict[int, int] = {}
    for entry in range(count):
        base = directory + 2 + 12 * entry
        if base + 12 > len(data):
            break
        tag, kind, number = struct.unpack_from(order + "HHI", data, base)
        if tag in (_TIFF_WIDTH, _TIFF_LENGTH, _TIFF_TILE_WIDTH, _TIFF_TILE_LENGTH) and number == 1 and kind in (3, 4):
            values[tag] = struct.unpack_from(order + ("H" if kind == 3 else "I"), data, base + 8)[0]
    width, length = values.get(_TIFF_WIDTH, 0), values.get(_TIFF_LENGTH, 0)
    tile_width, tile_length = values.get(_TIFF_TILE_WIDTH), values.get(_TIFF_TILE_LENGTH)
    if tile_width is None or tile_length is None:
        return
    # Tiles are multiples of 16 and may overhang the image, but by less than one tile step; a
    # decoder allocates a whole tile whatever the image size.
    if tile_width > _round16(width) or tile_length > _round16(length):
        raise ImageInputError(ErrorCode.INVALID_IMAGE, f"TIFF tile is {tile_width}x{tile_length}, larger than its {width}x{length} image")


def _round16(value: int) -> int:
    return max(16, -(-value // 16) * 16)
