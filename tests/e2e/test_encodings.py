"""Storage-ready encodings (int8, uint8, binary, ubinary) against the float path they come from."""

from __future__ import annotations

import numpy as np
import pytest

from devtools.photos import EXAMPLES, example_paths
from shared.vectors import INT8_SCALE, dequantise_int8, unpack_bits
from tests.support.images import data_uri
from tests.support.jobs import all_results, submit, wait_done
from tests.support.stack import Stack

IMAGES = [data_uri(path.read_bytes(), "image/png" if path.suffix == ".png" else "image/jpeg") for path in example_paths()]
DTYPES = {"int8": np.int8, "uint8": np.uint8, "binary": np.int8, "ubinary": np.uint8}


def _embed(service: Stack, encoding: str, **extra: object) -> list[dict]:
    with service.client() as client:
        response = client.post("/v1/embeddings", json={"input": IMAGES, "encoding_format": encoding, **extra})
    assert response.status_code == 200, response.text
    return response.json()["data"]


def _check_against_float(encoding: str, items: list[dict], reference: list[dict], pooling: str) -> None:
    for item, float_item in zip(items, reference, strict=True):
        assert item["embedding"] == item["embeddings"][pooling]
        for name in ("cls", "mean"):
            expected = np.asarray(float_item["embeddings"][name], dtype=np.float32)
            values = np.asarray(item["embeddings"][name])
            assert all(isinstance(v, int) for v in item["embeddings"][name])
            info = np.iinfo(DTYPES[encoding])
            assert values.min() >= info.min and values.max() <= info.max
            values = values.astype(DTYPES[encoding])
            if encoding in ("int8", "uint8"):
                assert values.shape == expected.shape
                # Decoded, each component is within half a quantisation step of the float vector.
                assert np.abs(dequantise_int8(values) - expected).max() <= 0.5 / INT8_SCALE + 1e-6
            else:
                assert values.shape == (-(-expected.shape[0] // 8),)
                assert np.array_equal(unpack_bits(values, expected.shape[0]), (expected > 0).astype(np.uint8))


@pytest.mark.parametrize("encoding", ["int8", "uint8", "binary", "ubinary"])
def test_encodings_match_the_float_vectors(service: Stack, encoding: str) -> None:
    for pooling in ("cls", "mean"):
        reference = _embed(service, "float", pooling=pooling)
        _check_against_float(encoding, _embed(service, encoding, pooling=pooling), reference, pooling)


def test_encodings_follow_truncation_and_each_other(service: Stack) -> None:
    reference = _embed(service, "float", dimensions=12)
    int8, uint8 = _embed(service, "int8", dimensions=12), _embed(service, "uint8", dimensions=12)
    binary, ubinary = _embed(service, "binary", dimensions=12), _embed(service, "ubinary", dimensions=12)
    _check_against_float("int8", int8, reference, "cls")
    _check_against_float("binary", binary, reference, "cls")
    for signed, unsigned in ((int8, uint8), (binary, ubinary)):
        for a, b in zip(signed, unsigned):
            for name in ("cls", "mean"):
                assert [v + 128 for v in a["embeddings"][name]] == b["embeddings"][name]
    # 12 components pack into 2 bytes, the last 4 bits zero.
    assert all(len(item["embedding"]) == 2 and item["embedding"][1] % 16 == 0 for item in ubinary)


def test_jobs_return_the_encoding_they_were_asked_for(service: Stack) -> None:
    reference = _embed(service, "float", pooling="mean")
    with service.client() as client:
        job = submit(client, {"input": IMAGES, "encoding_format": "binary", "pooling": "mean"})
        assert wait_done(client, job["id"])["status"] == "completed"
        items = all_results(client, job["id"])
    _check_against_float("binary", items, reference, "mean")


def test_unknown_encoding_is_a_clear_400(service: Stack) -> None:
    with service.client() as client:
        response = client.post("/v1/embeddings", json={"input": data_uri((EXAMPLES / "cmp1.jpg").read_bytes()), "encoding_format": "int4"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "encoding_format" and "int8" in error["message"] and "binary" in error["message"]
