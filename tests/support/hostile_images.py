"""A corpus of malformed and malicious images, generated from real photos at test time.

``REFUSED`` must each get a 400 naming the input; ``ACCEPTED`` are odd but legitimate files that must
be embedded (first frame of an animation, deep or unusual colour modes).
"""

from __future__ import annotations

import io
import struct
import zlib
from functools import cache

import numpy as np
from PIL import Image

from devtools.photos import EXAMPLES, encode


def _photo() -> Image.Image:
    return Image.open(EXAMPLES / "cmp1.jpg").convert("RGB")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int, idat: bytes, color_type: int = 0) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _png_bomb(side: int) -> bytes:
    """A real, valid grayscale PNG of side x side zeros: tiny on the wire, huge once decoded."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (side + 1)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return _png(side, side, body)


def _jpeg_with_size(width: int, height: int) -> bytes:
    """A real JPEG whose frame header claims other dimensions."""
    data = bytearray(encode(_photo(), "JPEG", quality=80))
    sof = next(i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2))
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _gif_with_screen(width: int, height: int) -> bytes:
    data = bytearray(encode(_photo().convert("P"), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def _animated(fmt: str) -> bytes:
    frames = [_photo().resize((64, 48)), Image.new("RGB", (64, 48), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def _tiff_huge() -> bytes:
    data = bytearray(encode(_photo().resize((32, 32)), "TIFF"))
    # Rewrite the ImageWidth/ImageLength entries (tags 256/257) of the first IFD.
    offset = struct.unpack("<I", data[4:8])[0]
    count = struct.unpack("<H", data[offset : offset + 2])[0]
    for entry in range(count):
        base = offset + 2 + 12 * entry
        tag, kind = struct.unpack("<HH", data[base : base + 4])
        if tag in (256, 257):
            data[base + 8 : base + 12] = struct.pack("<I", 200_000) if kind == 4 else struct.pack("<HH", 60_000, 0)
    return bytes(data)


@cache
def refused() -> dict[str, bytes]:
    jpeg = encode(_photo(), "JPEG", quality=90)
    png = encode(_photo(), "PNG")
    return {
        "empty": b"",
        "text": b"just some text, no image here",
        "html": b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>",
        "svg": b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'><rect width='10' height='10'/></svg>",
        "pdf": b"%PDF-1.7\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF",
        "eps-needs-ghostscript": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
        "zip": b"PK\x03\x04" + b"\x00" * 60,
        "truncated-jpeg": jpeg[: len(jpeg) // 2],
        "truncated-png": png[: len(png) // 2],
        "jpeg-magic-only": b"\xff\xd8\xff\xe0" + b"\x00" * 100,
        "png-magic-only": b"\x89PNG\r\n\x1a\n",
        "png-bad-crc": png[:20] + bytes([png[20] ^ 0xFF]) + png[21:],
        "png-zero-size": _png(0, 0, zlib.compress(b"")),
        "png-bomb-64mpx": _png_bomb(8_000),
        "png-header-says-1e10px": _png(100_000, 100_000, zlib.compress(b"\x00" * 101)),
        "jpeg-header-says-60000px": _jpeg_with_size(60_000, 60_000),
        "gif-screen-65535px": _gif_with_screen(65_535, 65_535),
        "tiff-header-says-huge": _tiff_huge(),
        "random-bytes": np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    }


@cache
def accepted() -> dict[str, bytes]:
    photo = _photo()
    deep = (np.asarray(photo.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    return {
        "animated-gif": _animated("GIF"),
        "animated-webp": _animated("WEBP"),
        "apng": _animated("PNG"),
        "png-16bit": encode(Image.fromarray(deep), "PNG"),
        "cmyk-jpeg": encode(photo.convert("CMYK"), "JPEG"),
        "palette-png": encode(photo.convert("P"), "PNG"),
        "one-pixel": encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
        "very-wide": encode(photo.resize((4000, 20)), "PNG"),
        "bmp": encode(photo, "BMP"),
        "tiff": encode(photo, "TIFF"),
    }


# --- Files whose cost lies in their structure or in the memory decoding needs (issue 11) -------------


def jpeg_many_scans(scans: int, size: tuple[int, int] = (256, 192)) -> bytes:
    """A progressive JPEG whose last scan repeats until there are ``scans`` of them. libjpeg only
    warns about each repeated, empty scan and runs a pass over the image for it."""
    data = encode(_photo().resize(size), "JPEG", quality=90, progressive=True)
    # Outside entropy-coded data 0xFF is never followed by 0xDA, so this finds the scans themselves.
    last = data.rindex(b"\xff\xda")
    header = data[last : last + 2 + struct.unpack(">H", data[last + 2 : last + 4])[0]]
    # A scan header with no entropy-coded data: libjpeg warns of premature end and still walks every block.
    return data[:-2] + header * (scans - data.count(b"\xff\xda")) + data[-2:]


def jpeg_metadata_flood(total_bytes: int, segment_bytes: int = 0) -> bytes:
    """A real JPEG preceded by APP15 segments of ``segment_bytes`` payload, ``total_bytes`` of them."""
    segment = b"\xff\xef" + struct.pack(">H", segment_bytes + 2) + b"\x00" * segment_bytes
    jpeg = encode(_photo().resize((64, 48)), "JPEG")
    return jpeg[:2] + segment * ((total_bytes - len(jpeg)) // len(segment)) + jpeg[2:]


def png_chunk_flood(total_bytes: int, kind: bytes, payload: bytes = b"") -> bytes:
    """A real PNG with ancillary chunks (text or unknown) inserted before its image data."""
    png = encode(_photo().resize((64, 48)), "PNG")
    chunk = _png_chunk(kind, payload)
    idat = png.index(b"IDAT") - 4
    return png[:idat] + chunk * ((total_bytes - len(png)) // len(chunk)) + png[idat:]


def bmp_rle8(width: int, height: int) -> bytes:
    """An 8-bit RLE BMP: every row a run of one colour, then end-of-line (Pillow decodes it in Python)."""
    row = b"\x01\x07" * width + b"\x00\x00"
    pixels = row * height + b"\x00\x01"
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels


def png_gray(width: int, height: int, bit_depth: int = 8) -> bytes:
    """A real grayscale PNG of zeros: a few hundred bytes whatever its size."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + width * bit_depth // 8)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def tiff_gray16(side: int) -> bytes:
    """An uncompressed-header, Deflate-compressed 16-bit grayscale TIFF of zeros."""
    return encode(Image.new("I;16", (side, side)), "TIFF", compression="tiff_adobe_deflate")


def tiff_one_huge_tile(side: int = 16_384, image_side: int = 16) -> bytes:
    """A TIFF of a small image declaring a single side x side tile (little-endian, uncompressed)."""
    entries = [(256, 3, 1, image_side), (257, 3, 1, image_side), (258, 3, 1, 8), (259, 3, 1, 8), (262, 3, 1, 1), (277, 3, 1, 1),
               (322, 4, 1, side), (323, 4, 1, side), (324, 4, 1, 0), (325, 4, 1, 1)]
    directory = 8
    data_offset = directory + 2 + 12 * len(entries) + 4
    body = struct.pack("<2sHI", b"II", 42, directory) + struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        value = data_offset if tag == 324 else value
        body += struct.pack("<HHI", tag, kind, count) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
    return body + struct.pack("<I", 0) + b"\x00"


def tiff_float(values: np.ndarray) -> bytes:
    """A 32-bit float grayscale TIFF (Pillow mode F)."""
    return encode(Image.fromarray(values.astype(np.float32), mode="F"), "TIFF")


# Just under IMBEDDINGS_MAX_IMAGE_BYTES' default, so that the structure is what gets refused.
_UNDER_SIZE_LIMIT = 20 * 2**20 - 64 * 1024


@cache
def refused_by_structure() -> dict[str, tuple[bytes, str, str]]:
    """name -> (bytes, error code, a phrase the message must contain)."""
    return {
        "jpeg-1000-scans": (jpeg_many_scans(1_000), "too_many_scans", "IMBEDDINGS_JPEG_MAX_SCANS"),
        "jpeg-10000-scans": (jpeg_many_scans(10_000), "too_many_scans", "IMBEDDINGS_JPEG_MAX_SCANS"),
        "jpeg-20MiB-empty-APPn": (jpeg_metadata_flood(_UNDER_SIZE_LIMIT), "too_many_segments", "IMBEDDINGS_MAX_IMAGE_SEGMENTS"),
        "jpeg-20MiB-big-APPn": (jpeg_metadata_flood(_UNDER_SIZE_LIMIT, 65_000), "metadata_too_large", "IMBEDDINGS_MAX_METADATA_BYTES"),
        "png-20MiB-text-chunks": (png_chunk_flood(_UNDER_SIZE_LIMIT, b"tEXt", b"k\x00v"), "too_many_segments", "IMBEDDINGS_MAX_IMAGE_SEGMENTS"),
        "png-20MiB-unknown-chunks": (png_chunk_flood(_UNDER_SIZE_LIMIT, b"zzZz"), "too_many_segments", "IMBEDDINGS_MAX_IMAGE_SEGMENTS"),
        "png-big-unknown-chunks": (png_chunk_flood(_UNDER_SIZE_LIMIT, b"zzZz", b"\x00" * 60_000), "metadata_too_large", "IMBEDDINGS_MAX_METADATA_BYTES"),
        "bmp-rle8": (bmp_rle8(4000, 2500), "unsupported_image", "RLE8"),
        "png-1x16384": (png_gray(1, 16_384), "image_too_large", "the model's resize makes it"),
        "png-16bit-7071px": (png_gray(7071, 7071, 16), "image_too_large", "IMBEDDINGS_DECODE_MAX_BYTES"),
        "tiff-16bit-7071px": (tiff_gray16(7071), "image_too_large", "IMBEDDINGS_DECODE_MAX_BYTES"),
        "tiff-one-16384px-tile": (tiff_one_huge_tile(), "invalid_image", "tile is 16384x16384"),
    }


@cache
def heavy_jpeg() -> bytes:
    """Within every limit: 7000x7000, 100 scans, ~1 MB. Decoding it costs seconds of CPU."""
    return jpeg_many_scans(100, (7000, 7000))
