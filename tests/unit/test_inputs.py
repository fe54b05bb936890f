"""The API's check of input form: what is a URL, a data URI, plain base64, and what is refused."""

from __future__ import annotations

import base64

import pytest

from api.errors import ApiError
from api.inputs import parse_inputs, parse_one
from api.schemas import ImageObject

RAW = b"\x89PNG\r\n\x1a\n" + b"\0" * 30
PNG = base64.b64encode(RAW).decode()


def test_kinds() -> None:
    assert parse_one(0, "https://example.com/a.jpg", 1000).url == "https://example.com/a.jpg"
    assert parse_one(0, "HTTP://example.com/a.jpg", 1000).url == "HTTP://example.com/a.jpg"
    image = parse_one(3, f"data:image/png;base64,{PNG}", 1000)
    assert (image.index, image.data, image.url) == (3, RAW, None)
    assert parse_one(0, f"  {PNG[:20]}\n{PNG[20:]}  ", 1000).data == RAW  # wrapped base64 is fine


@pytest.mark.parametrize(
    ("value", "code"),
    [
        ("", "invalid_image"),
        ("file:///etc/passwd", "invalid_url"),
        ("gopher://example.com/", "invalid_url"),
        ("http://", "invalid_url"),
        ("http://example.com:99999/a.jpg", "invalid_url"),
        ("data:image/png;base64,!!!", "invalid_base64"),
        ("data:application/pdf;base64," + PNG, "unsupported_media_type"),
        ("data:image/png," + PNG, "invalid_image"),
        ("data:,", "invalid_image"),
        ("%%%%", "invalid_base64"),
        ("\x80", "invalid_base64"),
        ("data:image/png;base64,ÿÿÿÿ", "invalid_base64"),
    ],
)
def test_refusals_name_the_index(value: str, code: str) -> None:
    with pytest.raises(ApiError) as error:
        parse_one(7, value, 1000)
    assert error.value.status == 400 and error.value.code == code and error.value.param == "input[7]"
    assert error.value.message.startswith("input[7]:")


def test_size_and_count_limits() -> None:
    with pytest.raises(ApiError, match="over the limit of 10 bytes"):
        parse_one(0, PNG, 10)
    with pytest.raises(ApiError, match="over the limit of 2 per request"):
        parse_inputs([PNG, PNG, PNG], max_inputs=2, max_image_bytes=1000)


def test_objects_are_parsed_in_order() -> None:
    refs = parse_inputs([ImageObject(image_base64=PNG), ImageObject(image_url="https://x.test/a.png")], 10, 1000)
    assert [(r.index, r.data is not None, r.url) for r in refs] == [(0, True, None), (1, False, "https://x.test/a.png")]


def test_url_safe_and_unpadded_base64_are_accepted() -> None:
    raw = bytes(range(256)) * 3 + b"\xfb\xff"  # every byte value, so + and / (- and _) occur; 770 bytes needs padding
    standard = base64.b64encode(raw).decode()
    url_safe = base64.urlsafe_b64encode(raw).decode()
    assert "=" in standard and ("-" in url_safe and "_" in url_safe)
    for text in (standard, standard.rstrip("="), url_safe, url_safe.rstrip("="), f"data:image/png;base64,{url_safe.rstrip('=')}"):
        assert parse_one(0, text, 1000).data == raw
    for broken in (url_safe[:10] + "+" + url_safe[11:], standard[:1025]):  # mixed alphabets; a length no base64 has
        with pytest.raises(ApiError) as error:
            parse_one(2, broken, 1000)
        assert error.value.code == "invalid_base64" and error.value.param == "input[2]"
