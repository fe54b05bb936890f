"""POST /v1/embeddings over real HTTP, Redis and a worker: input forms, output options, errors."""

from __future__ import annotations

import base64
import time

import numpy as np
import pytest

from devtools.photos import EXAMPLES
from tests.support.images import ImageServer, data_uri
from tests.support.stack import Stack

JPEG = (EXAMPLES / "cmp1.jpg").read_bytes()
PNG = (EXAMPLES / "cmp3.png").read_bytes()


def _post(service: Stack, body: dict) -> tuple[int, dict]:
    with service.client() as client:
        response = client.post("/v1/embeddings", json=body)
    return response.status_code, response.json()


def _error(service: Stack, body: dict, status: int) -> dict:
    code, payload = _post(service, body)
    assert code == status, payload
    assert set(payload) == {"error"} and set(payload["error"]) == {"message", "type", "param", "code"}
    return payload["error"]


def test_every_input_form_gives_the_same_vectors(service: Stack, image_server: ImageServer) -> None:
    b64 = base64.b64encode(JPEG).decode()
    forms = [
        image_server.url("cmp1.jpg"),
        data_uri(JPEG),
        b64,
        {"type": "image", "image_url": image_server.url("cmp1.jpg")},
        {"type": "image", "image_url": data_uri(JPEG)},
        {"type": "image", "image_base64": b64},
    ]
    status, body = _post(service, {"input": forms})
    assert status == 200, body
    vectors = np.array([item["embedding"] for item in body["data"]])
    assert np.abs(vectors - vectors[0]).max() < 1e-6
    single_status, single = _post(service, {"input": b64})
    assert single_status == 200 and len(single["data"]) == 1
    assert np.abs(np.array(single["data"][0]["embedding"]) - vectors[0]).max() < 1e-6


def test_response_shape_usage_and_order(service: Stack) -> None:
    status, body = _post(service, {"input": [data_uri(JPEG), data_uri(PNG, "image/png"), data_uri(JPEG)]})
    assert status == 200, body
    assert body["object"] == "list" and body["model"] == service.model("dinov2-tiny")
    assert [item["index"] for item in body["data"]] == [0, 1, 2]
    assert all(item["object"] == "embedding" for item in body["data"])
    first, second, third = (np.array(item["embedding"]) for item in body["data"])
    assert np.allclose(first, third, atol=1e-7) and not np.allclose(first, second, atol=1e-3)
    # dinov2-tiny: 56x56 crop, 14px patches -> 16 patches + CLS = 17 tokens per image
    assert body["usage"] == {"prompt_tokens": 51, "total_tokens": 51, "input_images": 3, "embedding_dim": 32}


def test_base64_encoding_and_pooling(service: Stack) -> None:
    _, floats = _post(service, {"input": data_uri(JPEG), "pooling": "mean"})
    _, encoded = _post(service, {"input": data_uri(JPEG), "pooling": "mean", "encoding_format": "base64"})
    item = encoded["data"][0]
    decoded = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
    assert np.array_equal(decoded, np.asarray(floats["data"][0]["embedding"], dtype=np.float32))
    assert item["embedding"] == item["embeddings"]["mean"] != item["embeddings"]["cls"]
    cls = np.frombuffer(base64.b64decode(item["embeddings"]["cls"]), dtype="<f4")
    assert np.array_equal(cls, np.asarray(floats["data"][0]["embeddings"]["cls"], dtype=np.float32))


def test_dimensions_truncates_and_renormalizes(service: Stack) -> None:
    _, full = _post(service, {"input": data_uri(JPEG)})
    status, short = _post(service, {"input": data_uri(JPEG), "dimensions": 8})
    assert status == 200
    vector = np.array(short["data"][0]["embedding"])
    expected = np.array(full["data"][0]["embedding"][:8])
    assert vector.shape == (8,) and np.allclose(vector, expected / np.linalg.norm(expected), atol=1e-6)
    assert len(short["data"][0]["embeddings"]["mean"]) == 8
    assert short["usage"]["embedding_dim"] == 8
    error = _error(service, {"input": data_uri(JPEG), "dimensions": 33}, 400)
    assert error["param"] == "dimensions" and "32" in error["message"]


def test_other_families_are_routed_by_model(service: Stack) -> None:
    status, body = _post(service, {"model": service.model("dinov3-tiny"), "input": data_uri(JPEG)})
    assert status == 200 and body["model"] == service.model("dinov3-tiny")
    # 64x64 / 16px = 16 patches, + CLS + 4 registers
    assert body["usage"]["prompt_tokens"] == 21


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        ({"input": []}, "input", "empty"),
        ({"input": ""}, "input", "empty"),
        ({"input": ["   "]}, "input[0]", "empty"),
        ({"input": "not base64 at all!"}, "input[0]", "base64"),
        ({"input": [data_uri(JPEG), "data:text/plain;base64,aGVsbG8="]}, "input[1]", "not an image"),
        ({"input": [data_uri(JPEG), "data:image/png,rawbytes"]}, "input[1]", "base64"),
        ({"input": ["ftp://example.com/a.jpg"]}, "input[0]", "scheme"),
        ({"input": [{"type": "image"}]}, "input[0]", "exactly one"),
        ({"input": data_uri(JPEG), "encoding_format": "int4"}, "encoding_format", ""),
        ({"input": data_uri(JPEG), "pooling": "max"}, "pooling", ""),
        ({"input": data_uri(JPEG), "dimensions": 0}, "dimensions", ""),
        ({"input": data_uri(JPEG), "surprise": 1}, "surprise", "Extra"),
        ({"input": [1, 2, 3]}, "input", ""),
    ],
)
def test_malformed_requests_get_400_naming_the_problem(service: Stack, body: dict, param: str, needle: str) -> None:
    error = _error(service, body, 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] is not None and error["param"].startswith(param), error
    assert needle.lower() in error["message"].lower()


def test_broken_image_is_a_400_naming_its_index(service: Stack) -> None:
    truncated = JPEG[: len(JPEG) // 3]
    error = _error(service, {"input": [data_uri(JPEG), data_uri(b"GIF89a not really"), data_uri(truncated)]}, 400)
    assert error["param"] == "input[1]"
    assert error["message"].startswith("input[1]:") and "1 more input failed" in error["message"]


def test_unreachable_url_is_a_400_naming_its_index(service: Stack, image_server: ImageServer) -> None:
    error = _error(service, {"input": [data_uri(JPEG), image_server.url("missing.jpg")]}, 400)
    assert error["param"] == "input[1]" and "404" in error["message"]


def test_unknown_model_is_404(service: Stack) -> None:
    error = _error(service, {"model": "someone/not-listed", "input": data_uri(JPEG)}, 404)
    assert error["code"] == "model_not_found" and "not-listed" in error["message"]


def test_listed_model_without_worker_is_a_quick_503(service: Stack) -> None:
    started = time.monotonic()
    error = _error(service, {"model": service.model("unserved"), "input": data_uri(JPEG)}, 503)
    assert time.monotonic() - started < 2
    assert error["code"] == "model_not_served"


def test_malformed_json_and_wrong_routes(service: Stack) -> None:
    with service.client() as client:
        response = client.post("/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"})
        assert response.status_code == 400 and "error" in response.json()
        response = client.get("/v1/embeddings")
        assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"
        response = client.get("/v1/nothing-here")
        assert response.status_code == 404 and "error" in response.json()
