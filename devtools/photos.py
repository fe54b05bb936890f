"""Real photos, and the variants of them that exercise every decoding rule.

Each variant carries the bytes a client would send and the RGB image Transformers should be given
for the same picture, so the service can be compared against a plain Transformers run.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

PHOTOS = Path(__file__).resolve().parent / "photos"
EXAMPLES = PHOTOS / "examples"
BENCH = PHOTOS / "bench"


def example_paths() -> list[Path]:
    return sorted(EXAMPLES.iterdir(), key=lambda p: p.name)


def bench_paths() -> list[Path]:
    return sorted(p for p in BENCH.iterdir() if p.suffix == ".jpg")


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


@dataclass(frozen=True)
class Variant:
    name: str
    data: bytes
    reference: Image.Image  # what a Transformers user would hand the image processor


def _rgba(base: Image.Image) -> Image.Image:
    rgba = base.convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, rgba.width, dtype=np.uint8), (rgba.height, 1))
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


def _palette_with_transparency(base: Image.Image) -> Image.Image:
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette.info["transparency"] = palette.getpixel((0, 0))
    return palette


def _sixteen_bit(base: Image.Image) -> tuple[Image.Image, Image.Image]:
    gray = np.asarray(base.convert("L"), dtype=np.uint16)
    rng = np.random.default_rng(1)
    deep = gray * 257 + rng.integers(0, 2, gray.shape, dtype=np.uint16)  # low byte carries detail
    image16 = Image.fromarray(deep.astype(np.uint16))
    expected = Image.fromarray(np.round(deep / 257.0).astype(np.uint8))
    return image16, expected


def _exif_rotated(base: Image.Image, orientation: int) -> bytes:
    """Pixels stored sideways with an EXIF tag that says how to turn them upright."""
    stored = {6: base.transpose(Image.Transpose.ROTATE_90), 8: base.transpose(Image.Transpose.ROTATE_270), 3: base.transpose(Image.Transpose.ROTATE_180)}[
        orientation
    ]
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def decoding_variants() -> list[Variant]:
    """Every input kind the token/preprocessing contract names, built from real photos."""
    photo = Image.open(EXAMPLES / "cmp1.jpg").convert("RGB")
    second = Image.open(EXAMPLES / "cmp3.png").convert("RGB")
    variants = [Variant(p.name, p.read_bytes(), Image.open(p)) for p in example_paths()]
    variants.append(Variant("grayscale.png", encode(photo.convert("L"), "PNG"), photo.convert("L")))
    rgba = _rgba(second)
    variants.append(Variant("rgba.png", encode(rgba, "PNG"), rgba))
    palette = _palette_with_transparency(second)
    palette_bytes = encode(palette, "PNG")
    variants.append(Variant("palette-transparent.png", palette_bytes, Image.open(io.BytesIO(palette_bytes))))
    cmyk = photo.convert("CMYK")
    cmyk_bytes = encode(cmyk, "JPEG", quality=95)
    variants.append(Variant("cmyk.jpg", cmyk_bytes, Image.open(io.BytesIO(cmyk_bytes))))
    image16, expected16 = _sixteen_bit(second)
    variants.append(Variant("gray16.png", encode(image16, "PNG"), expected16))
    for orientation in (6, 8, 3):
        data = _exif_rotated(photo, orientation)
        variants.append(Variant(f"exif-orientation-{orientation}.jpg", data, ImageOps.exif_transpose(Image.open(io.BytesIO(data)))))
    return variants
