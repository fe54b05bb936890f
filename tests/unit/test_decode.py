"""Decoding rules: every image mode becomes upright 8-bit RGB; limits are checked before decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from devtools.photos import EXAMPLES, decoding_variants, encode
from worker.errors import ImageInputError
from worker.images.decode import DecodeLimits, decode_image

LIMITS = DecodeLimits(max_bytes=20 * 2**20, max_pixels=50_000_000, max_side=16_384)


@pytest.mark.parametrize("variant", decoding_variants(), ids=lambda v: v.name)
def test_every_variant_decodes_to_upright_rgb(variant) -> None:
    image = decode_image(variant.data, LIMITS)
    assert image.mode == "RGB"
    assert image.size == variant.reference.size


def test_transparency_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    out = np.asarray(decode_image(encode(rgba, "PNG"), LIMITS))
    assert tuple(out[0, 0]) == (10, 20, 30)
    assert tuple(out[4, 4]) == (255, 255, 255)


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    deep = np.full((4, 4), 32768, dtype=np.uint16)  # mid-grey at 16 bits
    out = np.asarray(decode_image(encode(Image.fromarray(deep), "PNG"), LIMITS))
    assert out.shape == (4, 4, 3) and int(out[0, 0, 0]) == 128  # clipping would give 255


def test_exif_rotation_is_applied() -> None:
    photo = Image.open(EXAMPLES / "cmp1.jpg").convert("RGB")
    sideways = photo.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = decode_image(encode(sideways, "JPEG", quality=95, exif=exif.tobytes()), LIMITS)
    assert upright.size == photo.size


def test_first_frame_of_animation() -> None:
    frames = [Image.new("RGB", (16, 16), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    out = np.asarray(decode_image(buffer.getvalue(), LIMITS))
    assert out[0, 0, 0] > 200 and out[0, 0, 2] < 50


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "invalid_image"),
        (b"hello, I am text", "invalid_image"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "invalid_image"),
        (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n", "invalid_image"),
        ((EXAMPLES / "cmp1.jpg").read_bytes()[:2000], "invalid_image"),
    ],
    ids=["empty", "text", "svg", "pdf", "truncated-jpeg"],
)
def test_bad_data_is_a_clear_image_error(data: bytes, code: str) -> None:
    with pytest.raises(ImageInputError) as error:
        decode_image(data, LIMITS)
    assert error.value.code == code and error.value.message


def test_limits_are_checked_from_the_header() -> None:
    big = encode(Image.new("L", (3000, 2000)), "PNG")
    with pytest.raises(ImageInputError, match="over the limit of 5000000"):
        decode_image(big, DecodeLimits(max_bytes=2**30, max_pixels=5_000_000, max_side=16_384))
    with pytest.raises(ImageInputError, match="side over the limit of 2048"):
        decode_image(big, DecodeLimits(max_bytes=2**30, max_pixels=10**9, max_side=2048))
    with pytest.raises(ImageInputError, match="bytes, over the limit"):
        decode_image(big, DecodeLimits(max_bytes=100, max_pixels=10**9, max_side=16_384))
