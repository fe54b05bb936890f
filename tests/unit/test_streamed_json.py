"""A job's body read as it arrives (``StreamedJSONObject``): whatever the pieces it arrives in, the items
and the other members are those a whole-body parse finds, and the bounds of a whole body hold."""

from __future__ import annotations

import orjson
import pytest
from fastapi.exceptions import RequestValidationError

from api.errors import ApiError
from api.json_body import JSON_VALUES_BASE, JSON_VALUES_PER_INPUT, StreamedJSONObject
from api.schemas import EmbeddingRequest

BODY = (
    b'{"model": "m", "input": ["http:\\/\\/a.test\\/\\u00e9.jpg", "data:image/png;base64,iVBO", '
    b'{"type": "image", "image_url": "x\\"y"}, 7, [1, {"a": null}], "\xc3\xa9t\xc3\xa9"], "pooling": "mean", "dimensions": 8.0, "user": "\\u0041b"}'
)


def _read(body: bytes, piece: int, max_inputs: int = 100) -> tuple[StreamedJSONObject, list[tuple[int, object]]]:
    reader = StreamedJSONObject("input", max_inputs)
    items = []
    for start in range(0, len(body), piece):
        items += reader.feed(body[start : start + piece])
    return reader, items + reader.end()


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 64, len(BODY)])
def test_items_and_members_are_those_of_a_whole_parse_whatever_the_pieces(piece: int) -> None:
    whole = orjson.loads(BODY)
    reader, items = _read(BODY, piece)
    assert items == list(enumerate(whole["input"]))
    probe = ["image"]
    request = reader.validate(EmbeddingRequest, probe, [])
    assert (request.model, request.pooling, request.dimensions, request.user, request.input) == ("m", "mean", 8, "Ab", probe)


def test_errors_of_items_are_reported_at_their_positions() -> None:
    reader, items = _read(BODY.replace(b'"user": "\\u0041b"', b'"user": {"k": [true, false]}'), 5)
    malformed = [(index, value) for index, value in items if not isinstance(value, str | dict)]
    with pytest.raises(RequestValidationError) as refused:
        reader.validate(EmbeddingRequest, [value for _, value in malformed], [index for index, _ in malformed])
    assert [error["loc"] for error in refused.value.errors()] == [("body", "input", 3), ("body", "input", 4), ("body", "user")]


def test_one_image_and_a_missing_input_validate_as_a_whole_body_does() -> None:
    reader, items = _read(b'{"input": "http://a.test/x.jpg"}', 4)
    assert items == [] and reader.field_value == "http://a.test/x.jpg" and not reader.array_seen
    assert reader.validate(EmbeddingRequest, reader.field_value, []).input == "http://a.test/x.jpg"
    for body, message in ((b'{"model": "m"}', "Field required"), (b'{"input": ""}', "input is empty"), (b"[1, 2]", "valid dictionary")):
        reader, _ = _read(body, 3)
        with pytest.raises(RequestValidationError, match=message):
            reader.validate(EmbeddingRequest, reader.field_value, [])


def test_items_past_the_limit_are_counted_not_kept_and_refused_at_the_end() -> None:
    reader = StreamedJSONObject("input", 3)
    body = orjson.dumps({"input": [f"http://a.test/{i}.jpg" for i in range(10)]})
    items = reader.feed(body)
    assert [index for index, _ in items] == [0, 1, 2]
    with pytest.raises(ApiError) as refused:
        reader.end()
    assert refused.value.code == "too_many_inputs" and "input has 10 images, over the limit of 3" in refused.value.message


def test_a_body_over_the_value_bound_is_refused_while_it_is_read() -> None:
    bound = JSON_VALUES_PER_INPUT * 2 + JSON_VALUES_BASE
    reader = StreamedJSONObject("input", 2)
    reader.feed(b'{"user": [')
    with pytest.raises(ApiError) as refused:
        for _ in range(bound):
            reader.feed(b"[],")
    assert refused.value.code == "too_many_json_values" and str(bound) in refused.value.message


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"input": [', "invalid_json"),
        (b'{"input": ["x"]} x', "invalid_json"),
        (b'{"input": ["\xff"]}', "invalid_json"),
        (b'{"input": [NaN]}', "invalid_json"),
        (b'{"input": ["a"], "input": ["b"]}', "invalid_request"),
    ],
)
def test_malformed_bodies_are_refused_with_a_reason(body: bytes, code: str) -> None:
    with pytest.raises(ApiError) as refused:
        _read(body, 4)
    assert refused.value.code == code and refused.value.message
