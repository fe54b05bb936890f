"""The OpenAI Batch API over jobs, driven by the official ``openai`` client, unchanged."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest

from devtools.photos import EXAMPLES
from tests.support.images import ImageServer, data_uri
from tests.support.stack import Stack, start_api

KEYS = ("sk-batch-owner-5c1e", "sk-batch-other-9d7a")


def _client(service: Stack, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{service.base_url}/v1", api_key=key, max_retries=0)


def _upload(client: openai.OpenAI, lines: list[object]) -> str:
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    return client.files.create(file=("requests.jsonl", io.BytesIO(text.encode())), purpose="batch").id


def _request(custom_id: str, inputs: list[str], **options: object) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": {"input": inputs, **options}}


def _wait(client: openai.OpenAI, batch_id: str, timeout_s: float = 120) -> openai.types.Batch:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "cancelled", "failed", "expired"):
            return batch
        time.sleep(0.3)
    raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout_s} s")


def _jsonl(client: openai.OpenAI, file_id: str | None) -> dict[str, dict]:
    assert file_id is not None
    return {entry["custom_id"]: entry for entry in map(json.loads, client.files.content(file_id).text.splitlines())}


def test_openai_client_runs_a_batch_end_to_end(service: Stack, image_server: ImageServer) -> None:
    client = _client(service)
    photos = [data_uri((EXAMPLES / "cmp1.jpg").read_bytes()), image_server.url("cmp2.jpg")]
    lines = [
        _request("photos", photos),
        _request("mean-int8", [photos[0]], pooling="mean", encoding_format="int8"),
        _request("bad-image", [photos[0], "data:image/png;base64,AAAA"]),  # an image that cannot be decoded
        _request("unknown-model", [photos[0]], model="nobody/nothing"),
        {"custom_id": "wrong-url", "method": "POST", "url": "/v1/chat/completions", "body": {}},
        "{not json",
    ]
    file_id = _upload(client, lines)
    assert client.files.retrieve(file_id).purpose == "batch"
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h", metadata={"run": "test"})
    assert batch.status == "in_progress" and batch.request_counts.total == 6
    batch = _wait(client, batch.id)
    assert batch.status == "completed" and batch.metadata == {"run": "test"}
    assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 4)

    output = _jsonl(client, batch.output_file_id)
    assert set(output) == {"photos", "mean-int8"}
    with service.client() as http:
        reference = http.post("/v1/embeddings", json={"input": photos}).json()
        mean_int8 = http.post("/v1/embeddings", json={"input": [photos[0]], "pooling": "mean", "encoding_format": "int8"}).json()
    body = output["photos"]["response"]["body"]
    assert output["photos"]["response"]["status_code"] == 200 and output["photos"]["error"] is None
    assert body["usage"] == reference["usage"]
    for got, expected in zip(body["data"], reference["data"], strict=True):
        assert np.allclose(got["embedding"], expected["embedding"], atol=1e-7)
    assert output["mean-int8"]["response"]["body"]["data"][0]["embedding"] == mean_int8["data"][0]["embedding"]

    errors = _jsonl(client, batch.error_file_id)
    assert set(errors) == {"bad-image", "unknown-model", "wrong-url", "line-6"}
    bad = errors["bad-image"]["response"]
    assert bad["status_code"] == 400 and bad["body"]["error"]["param"] == "input[1]"
    assert errors["unknown-model"]["error"]["code"] == "model_not_found"
    assert "url" in errors["wrong-url"]["error"]["message"] and "not JSON" in errors["line-6"]["error"]["message"]
    assert batch.id in [b.id for b in client.batches.list(limit=100).data]

    # The input file can be read back and deleted; then it is gone.
    assert client.files.content(file_id).text.count("\n") == 6
    assert client.files.delete(file_id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(file_id)


def test_cancel_keeps_what_finished(service: Stack, slow_images: str) -> None:
    client = _client(service)
    # Each slow image takes 0.2 s to download, so most of the batch is still queued when it is cancelled.
    lines = [_request(f"r{i}", [f"{slow_images}/cmp1.jpg"] * 4) for i in range(30)]
    batch = client.batches.create(input_file_id=_upload(client, lines), endpoint="/v1/embeddings", completion_window="24h")
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at is not None
    counts = cancelled.request_counts
    assert counts.total == 30 and counts.completed + counts.failed == 30 and counts.failed > 0
    errors = _jsonl(client, cancelled.error_file_id)
    assert all(entry["error"]["code"] == "batch_cancelled" for entry in errors.values())
    assert client.batches.retrieve(batch.id).status == "cancelled"


@pytest.fixture(scope="module")
def keyed_api(service: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    api, base_url = start_api({**service.env, "IMBEDDINGS_API_KEYS": ",".join(KEYS)}, tmp_path_factory.mktemp("keyed") / "api.log")
    yield base_url
    api.stop()


def test_files_and_batches_belong_to_the_key_that_made_them(service: Stack, keyed_api: str) -> None:
    owner, other = (openai.OpenAI(base_url=f"{keyed_api}/v1", api_key=key, max_retries=0) for key in KEYS)
    file_id = _upload(owner, [_request("a", [data_uri((EXAMPLES / "cmp1.jpg").read_bytes())])])
    batch = owner.batches.create(input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h")
    for attempt in (lambda: other.files.retrieve(file_id), lambda: other.files.content(file_id), lambda: other.files.delete(file_id),
                    lambda: other.batches.retrieve(batch.id), lambda: other.batches.cancel(batch.id),
                    lambda: other.batches.create(input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h")):  # fmt: skip
        with pytest.raises(openai.NotFoundError):
            attempt()
    assert batch.id not in [b.id for b in other.batches.list().data]
    assert _wait(owner, batch.id).status == "completed"
    assert owner.files.retrieve(file_id).id == file_id
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed_api}/v1", api_key="sk-wrong", max_retries=0).files.retrieve(file_id)


def test_bad_batch_requests_get_clear_errors(service: Stack) -> None:
    client = _client(service)
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.BadRequestError) as wrong_endpoint:
        client.batches.create(input_file_id=_upload(client, [_request("a", ["x"])]), endpoint="/v1/chat/completions", completion_window="24h")
    assert wrong_endpoint.value.param == "endpoint"
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-missing", endpoint="/v1/embeddings", completion_window="24h")
    response = httpx.post(f"{service.base_url}/v1/files", files={"file": ("a.jsonl", b"{}")}, data={"purpose": "fine-tune"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "purpose"
