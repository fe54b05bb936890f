"""API keys, switching docs off, request limits, backpressure (429) and the sync timeout (504)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from devtools.photos import EXAMPLES
from devtools.processes import wait_until
from devtools.redis_server import RedisServer
from shared.queues import queue_for
from tests.support.images import data_uri, serve_photos
from tests.support.sockets import address
from tests.support.stack import Stack, private_stack, start_api

JPEG = (EXAMPLES / "cmp1.jpg").read_bytes()
KEYS = ("sk-first-7f3a9c", "sk-second-1b2d4e")


@pytest.fixture(scope="module")
def guarded_api(service: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    log = tmp_path_factory.mktemp("guarded") / "api.log"
    env = {
        **service.env,
        "IMBEDDINGS_API_KEYS": ",".join(KEYS),
        "IMBEDDINGS_DOCS_ENABLED": "false",
        "IMBEDDINGS_MAX_REQUEST_BYTES": "200000",
        "IMBEDDINGS_MAX_INPUTS_PER_REQUEST": "3",
        "IMBEDDINGS_MAX_IMAGE_BYTES": "60000",
        "IMBEDDINGS_LOG_LEVEL": "DEBUG",
    }
    api, base_url = start_api(env, log)
    yield base_url, log
    api.stop()


def test_api_keys(guarded_api: tuple[str, Path]) -> None:
    base_url, log = guarded_api
    body = {"input": data_uri(JPEG)}
    with httpx.Client(base_url=base_url, timeout=30) as client:
        missing = client.post("/v1/embeddings", json=body)
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = client.post("/v1/embeddings", json=body, headers={"Authorization": "Bearer sk-first-7f3a9d"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert client.post("/v1/embeddings", json=body, headers={"Authorization": "Basic c2stZmlyc3Q="}).status_code == 401
        for key in KEYS:
            assert client.post("/v1/embeddings", json=body, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        for path in ("/v1/models", f"/v1/jobs/job_{'0' * 24}"):
            assert client.get(path).status_code == 401
        assert client.get("/health").status_code == 200  # stays open for probes
    text = log.read_text()
    assert all(key not in text for key in KEYS) and "sk-first-7f3a9d" not in text


def test_docs_can_be_switched_off(guarded_api: tuple[str, Path]) -> None:
    with httpx.Client(base_url=guarded_api[0]) as client:
        assert client.get("/docs").status_code == 404 and client.get("/openapi.json").status_code == 404


def test_request_limits(guarded_api: tuple[str, Path]) -> None:
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    with httpx.Client(base_url=guarded_api[0], timeout=30, headers=headers) as client:
        too_big = client.post("/v1/embeddings", json={"input": [data_uri(JPEG)] * 6})
        assert too_big.status_code == 413 and "200000" in too_big.json()["error"]["message"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds on the stream itself
            yield b'{"input": "'
            for _ in range(100):
                yield b"A" * 4096
            yield b'"}'

        streamed = client.post("/v1/embeddings", content=chunks(), headers={"Content-Type": "application/json"})
        assert streamed.status_code == 413
        many = client.post("/v1/embeddings", json={"input": ["https://x.test/a.jpg"] * 4})
        assert many.status_code == 400 and many.json()["error"]["code"] == "too_many_inputs"
        large = client.post("/v1/embeddings", json={"input": data_uri(b"\xff" * 70_000)})
        assert large.status_code == 400 and large.json()["error"]["code"] == "image_too_large"
        info = client.get("/info").json()["settings"]
        assert (info["max_request_bytes"], info["max_inputs_per_request"], info["max_image_bytes"]) == (200000, 3, 60000)


def test_oversized_body_is_refused_before_it_is_read(guarded_api: tuple[str, Path]) -> None:
    """A declared Content-Length over the limit gets its 413 without sending the body."""
    with socket.create_connection(address(guarded_api[0])) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 999999999\r\n\r\n")
        answer = sock.recv(4096).decode()
    assert answer.startswith("HTTP/1.1 413")


@pytest.fixture
def busy_stack(tmp_path: Path, own_redis: RedisServer, allow_list: Path, tiny_models: dict[str, Path]) -> Iterator[tuple[str, str, dict[str, str]]]:
    """One worker that takes one request at a time, images that take 4 s to fetch, and an API with
    a queue limit of 2 and a 2 s wait."""
    limits = {"IMBEDDINGS_WORKER_CONCURRENCY": "1", "IMBEDDINGS_MAX_QUEUE_DEPTH": "2", "IMBEDDINGS_REQUEST_TIMEOUT_S": "2"}
    with private_stack(tmp_path, own_redis.url, allow_list, tiny_models, **limits) as stack, serve_photos(delay_s=4) as slow_base:
        yield stack.base_url, f"{slow_base}/cmp1.jpg", stack.env


def test_full_queue_gets_429_and_late_results_are_discarded(busy_stack: tuple[str, str, dict[str, str]]) -> None:
    base_url, slow_url, env = busy_stack

    def send(position: int) -> httpx.Response:
        time.sleep(0.25 * position)  # one after the other, so each sees the queue the others left
        with httpx.Client(base_url=base_url, timeout=30) as client:
            return client.post("/v1/embeddings", json={"input": slow_url})

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(send, range(8)))
    codes = sorted(answer.status_code for answer in answers)
    assert 429 in codes and 504 in codes, codes
    full = next(answer for answer in answers if answer.status_code == 429)
    assert int(full.headers["retry-after"]) > 0 and full.json()["error"]["code"] == "queue_full"
    late = next(answer for answer in answers if answer.status_code == 504)
    assert late.json()["error"]["code"] == "timeout" and "2 s" in late.json()["error"]["message"]
    # Work the API gave up on is skipped or its result dropped: nothing is left behind in Redis.
    store = redis.Redis.from_url(env["IMBEDDINGS_REDIS_URL"])
    queue = queue_for(env["IMBEDDINGS_DEFAULT_MODEL"], "interactive")
    wait_until(lambda: store.llen(queue) == 0 and not store.keys("imb:reply:*") and not store.keys("imb:blobs:*"), 60, what="abandoned work to be cleared")
