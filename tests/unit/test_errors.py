"""The error taxonomy: every code has one status and type, and the bodies built from the table are
the ones the service has always sent (byte for byte), whichever layer sends them."""

from __future__ import annotations

import orjson
import pytest

from api.errors import ERRORS, ApiError, error_json, first_failure, item_error_body
from shared.errors import ErrorCode
from shared.protocol import ItemError, ItemResult
from shared.urls import InvalidUrl, split_http_url


def test_every_code_has_a_status_and_a_type() -> None:
    assert set(ERRORS) == set(ErrorCode)
    for code, (status, kind) in ERRORS.items():
        assert 400 <= status < 600 and kind, code
        assert (status >= 500) == (kind in ("server_error", "service_unavailable", "timeout", "insufficient_storage")), code


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        (ErrorCode.REQUEST_TOO_LARGE, 413, "invalid_request_error"),
        (ErrorCode.TOO_MANY_BYTES_IN_FLIGHT, 429, "rate_limit_error"),
        (ErrorCode.BODY_TIMEOUT, 408, "invalid_request_error"),
        (ErrorCode.HEADER_TIMEOUT, 408, "invalid_request_error"),
        (ErrorCode.HEADERS_TOO_LARGE, 431, "invalid_request_error"),
    ],
)
def test_bodies_below_fastapi_are_the_ones_written_by_hand_before(code: ErrorCode, status: int, kind: str) -> None:
    assert ERRORS[code][0] == status
    assert error_json(code, "why") == orjson.dumps({"error": {"message": "why", "type": kind, "param": None, "code": code.value}})


def test_an_item_error_crosses_the_queue_as_code_and_message_and_gets_its_type_from_the_table() -> None:
    result = ItemResult(index=3, error=ItemError(message="the image's stored bytes expired", code=ErrorCode.INPUT_EXPIRED))
    wire = result.model_dump_json(exclude_none=True)
    assert orjson.loads(wire) == {"index": 3, "error": {"message": "the image's stored bytes expired", "code": "input_expired"}}
    body = item_error_body(ItemResult.model_validate_json(wire))
    assert orjson.dumps(body) == b'{"index":3,"error":{"message":"the image\'s stored bytes expired","type":"server_error","code":"input_expired"}}'


def test_results_stored_before_the_rename_stay_readable() -> None:
    stored = '{"index":0,"cls":"AAAAAA==","mean":"AAAAAA==","tokens":5}'
    result = ItemResult.model_validate_json(stored)
    assert (result.cls_b64, result.mean_b64) == ("AAAAAA==", "AAAAAA==")
    assert result.model_dump_json(exclude_none=True) == stored
    failed = ItemResult.model_validate_json('{"index":1,"error":{"message":"m","type":"invalid_request_error","code":"invalid_image"}}')
    assert failed.error == ItemError(message="m", code=ErrorCode.INVALID_IMAGE)


def test_a_synchronous_request_takes_the_first_failure_status_from_the_table() -> None:
    results = [
        ItemResult(index=0, cls="AAAAAA==", mean="AAAAAA=="),
        ItemResult(index=1, error=ItemError(message="inference failed: boom", code=ErrorCode.INFERENCE_FAILED)),
        ItemResult(index=2, error=ItemError(message="not an image", code=ErrorCode.INVALID_IMAGE)),
    ]
    failure = first_failure(results)
    assert isinstance(failure, ApiError)
    assert (failure.status, failure.type, failure.code, failure.param) == (500, "server_error", "inference_failed", "input[1]")
    assert failure.message == "input[1]: inference failed: boom (1 more input failed too)"
    assert first_failure(results[:1]) is None


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://host:99999/x.png", "malformed URL (Port out of range 0-65535)"),
        ("ftp://host/x.png", "URL scheme 'ftp' is not allowed (only http and https)"),
        ("http:///x.png", "URL has no host"),
    ],
)
def test_url_syntax_is_one_check_with_one_message(url: str, message: str) -> None:
    with pytest.raises(InvalidUrl) as error:
        split_http_url(url)
    assert str(error.value) == message
