"""A job's body read as it arrives, on a real API and Redis with the default settings and no worker
(everything here happens at submission): the API holds a window of the body, never the body; the
images reach Redis as they arrive; and a submission that fails part-way, however (a bad item, bad
JSON, too many images, an unknown model, the body limit, the body deadline, the client gone),
answers readably and leaves nothing in Redis."""

from __future__ import annotations

import base64
import math
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
import redis

from devtools.photos import BENCH
from devtools.processes import ServiceProcess, reset_peak_rss, status_kb, wait_until
from devtools.redis_server import RedisServer
from shared.queues import queue_for
from shared.settings import Settings
from shared.store.jobs import JobKeys
from tests.support.images import data_uri
from tests.support.sockets import address
from tests.support.stack import running_redis, service_env, start_api

MiB = 2**20
DEFAULTS = Settings(_env_file=None)
JOB_KEYS = JobKeys("imb:")
PHOTO = (BENCH / "coffee_1600x1200.jpg").read_bytes()  # 282 kB
# A data URI of 4 bytes: a body of 100,000 of them is small, and each is stored in Redis.
TINY = "data:image/png;base64," + base64.b64encode(b"\x89PNG").decode()


@dataclass
class UploadAPI:
    process: ServiceProcess
    base_url: str
    store: redis.Redis
    redis_url: str

    @property
    def address(self) -> tuple[str, int]:
        return address(self.base_url)

    def buffered_body_bytes(self) -> float:
        return _buffered(self.base_url)

    def job_keys(self) -> list[bytes]:
        return sorted(self.store.scan_iter(match="imb:job:*", count=1000))

    def used(self) -> int:
        return int(self.store.info("memory")["used_memory"])


@pytest.fixture(scope="module")
def upload_api(allow_list: Path, tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[UploadAPI]:
    root = tmp_path_factory.mktemp("upload")
    with running_redis(root / "redis") as server:
        api, base_url = start_api(service_env(server.url, allow_list, tiny_models), root / "api.log")
        try:
            yield UploadAPI(api, base_url, redis.Redis.from_url(server.url), server.url)
        finally:
            api.stop()


def _items(count: int, uri: str) -> bytes:
    return b",".join([orjson.dumps(uri)] * count)


def _post(api: UploadAPI, body: bytes | Iterator[bytes]) -> httpx.Response:
    with httpx.Client(base_url=api.base_url, timeout=120) as client:
        return client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})


@dataclass
class Before:
    keys: list[bytes]
    counts: dict[bytes, bytes]
    used: int


def _before(api: UploadAPI) -> Before:
    return Before(api.job_keys(), api.store.hgetall(JOB_KEYS.counts()), api.used())


def _assert_nothing_left(api: UploadAPI, before: Before) -> None:
    assert api.job_keys() == before.keys, api.job_keys()[:5]
    assert api.store.hgetall(JOB_KEYS.counts()) == before.counts
    wait_until(lambda: api.used() < before.used + MiB, 10, what="Redis to free what the job stored")
    wait_until(lambda: api.buffered_body_bytes() == 0, 10, what="the body budget to be released")


def test_a_large_job_reaches_redis_without_the_api_holding_its_body(upload_api: UploadAPI) -> None:
    """160 photos of 282 kB (57 MiB of JSON, within the default body limit): every image is in the
    job's blob hash, every chunk queued, and the API's peak RSS grew by a small part of the body
    (a whole-body parse held several times the body: README, "Jobs and bulk backfill")."""
    count = 160
    body = b'{"input": [' + _items(count, data_uri(PHOTO)) + b'], "pooling": "mean"}'
    assert len(body) < DEFAULTS.max_request_bytes
    pid = upload_api.process.pid
    before = status_kb(pid, "VmRSS") / 1024
    reset_peak_rss(pid)
    started = time.perf_counter()
    answer = _post(upload_api, body)
    elapsed = time.perf_counter() - started
    peak = status_kb(pid, "VmHWM") / 1024
    print(f"{count} x 282 kB job ({len(body) / MiB:.1f} MiB): {answer.status_code} in {elapsed:.2f} s; API RSS {before:.0f} -> peak {peak:.0f} MB")
    assert answer.status_code == 202, answer.text
    job = answer.json()
    assert (job["total"], job["status"]) == (count, "queued")
    blobs = JOB_KEYS.blobs(job["id"])
    assert upload_api.store.hlen(blobs) == count and upload_api.store.hget(blobs, str(count - 1)) == PHOTO
    assert upload_api.store.llen(queue_for(job["model"], "bulk")) == math.ceil(count / DEFAULTS.job_chunk_size)
    assert peak - before < len(body) / MiB / 2  # holding the body even once would take all of it
    assert httpx.delete(f"{upload_api.base_url}/v1/jobs/{job['id']}", timeout=30).status_code == 200
    upload_api.store.delete(queue_for(job["model"], "bulk"))


def _late_error(count: int) -> bytes:
    """Valid images, then malformed JSON, then 20 MiB more that the API reads and throws away."""
    return b'{"input": [' + _items(count, data_uri(PHOTO)) + b"]]]" + b" " * (20 * MiB)


REFUSED = {
    # body, status, code, param
    "malformed item last": (b'{"input": [' + _items(100, data_uri(PHOTO)) + b", 5]}", 400, "invalid_request", "input[100]"),
    "bad JSON mid-body": (_late_error(60), 400, "invalid_json", None),
    "too many images": (b'{"input": [' + _items(DEFAULTS.max_job_inputs + 1, TINY) + b"]}", 400, "too_many_inputs", "input"),
    "unknown model after the images": (b'{"input": [' + _items(100, data_uri(PHOTO)) + b'], "model": "nobody/nothing"}', 404, "model_not_found", "model"),
    "over the body limit, chunked": (None, 413, "request_too_large", None),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_submission_refused_part_way_leaves_nothing_behind(upload_api: UploadAPI, case: str) -> None:
    body, status, code, param = REFUSED[case]
    if body is None:  # no Content-Length: refused once the limit is passed, images already stored
        piece = b'"' + data_uri(PHOTO).encode() + b'",'
        body = iter([b'{"input": [', *[piece] * (DEFAULTS.max_request_bytes // len(piece) + 10), b"]}"])
    before = _before(upload_api)
    answer = _post(upload_api, body)
    print(f"{case}: {answer.status_code} {answer.text[:200]}")
    assert answer.status_code == status and answer.json()["error"]["code"] == code and answer.json()["error"]["param"] == param, answer.text
    _assert_nothing_left(upload_api, before)


def test_a_client_gone_mid_upload_leaves_nothing_behind(upload_api: UploadAPI) -> None:
    """Half of a declared body is sent: its images reach Redis as they arrive; then the client hangs up."""
    before = _before(upload_api)
    half = b'{"input": [' + _items(60, data_uri(PHOTO)) + b","
    with socket.create_connection(upload_api.address, timeout=30) as sock:
        sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (2 * len(half)))
        sock.sendall(half)
        wait_until(lambda: set(upload_api.job_keys()) - set(before.keys), 30, what="the first images to reach Redis")
        (blobs,) = set(upload_api.job_keys()) - set(before.keys)
        stored = upload_api.store.hlen(blobs)
    print(f"client gone after {len(half) / MiB:.1f} MiB of {2 * len(half) / MiB:.1f}; {stored} images had reached Redis")
    assert stored > 0
    wait_until(lambda: upload_api.job_keys() == before.keys, 30, what="the job's images to be deleted")
    _assert_nothing_left(upload_api, before)


def test_a_stalled_job_upload_gets_408_and_leaves_nothing(allow_list: Path, tiny_models: dict[str, Path], tmp_path: Path, own_redis: RedisServer) -> None:
    """The body deadline (2 s here) holds for a body read as it arrives, as for a whole one."""
    api, base_url = start_api(service_env(own_redis.url, allow_list, tiny_models, IMBEDDINGS_BODY_TIMEOUT_S="2"), tmp_path / "api.log")
    store = redis.Redis.from_url(own_redis.url)
    try:
        part = b'{"input": [' + _items(30, data_uri(PHOTO)) + b","  # past one pipeline of images: stored before the stall
        with socket.create_connection(address(base_url), timeout=30) as sock:
            sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (4 * len(part)))
            sock.sendall(part)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        head, _, payload = answer.partition(b"\r\n\r\n")
        print(f"stalled job upload: {head.splitlines()[0] if head else b'nothing'}")
        assert head.startswith(b"HTTP/1.1 408") and orjson.loads(payload)["error"]["code"] == "body_timeout"
        wait_until(lambda: list(store.scan_iter(match="imb:job:*")) == [], 10, what="the job's images to be deleted")
    finally:
        api.stop()


def test_a_job_upload_shares_the_body_budget(allow_list: Path, tiny_models: dict[str, Path], tmp_path: Path, own_redis: RedisServer) -> None:
    """With the budget at its smallest (the body limit, 16 MiB here) and held by another upload, a job
    gets 429 with Retry-After once it holds its first bytes, and leaves nothing; once the other
    upload is gone, the same job goes in."""
    limit = str(16 * MiB)
    env = service_env(own_redis.url, allow_list, tiny_models, IMBEDDINGS_MAX_REQUEST_BYTES=limit, IMBEDDINGS_MAX_BUFFERED_BYTES=limit)
    api, base_url = start_api(env, tmp_path / "api.log")
    store = redis.Redis.from_url(own_redis.url)
    body = b'{"input": [' + _items(30, data_uri(PHOTO)) + b"]}"
    try:
        with socket.create_connection(address(base_url), timeout=30) as other:
            other.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n{" % (16 * MiB))
            wait_until(lambda: _buffered(base_url) == 16 * MiB, 10, what="the other upload to hold the budget")
            with httpx.Client(base_url=base_url, timeout=60) as client:
                refused = client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
            print(f"job while the budget is held: {refused.status_code} {refused.text[:200]}")
            assert refused.status_code == 429 and refused.headers["Retry-After"] == "2"
            assert refused.json()["error"]["code"] == "too_many_bytes_in_flight"
            assert list(store.scan_iter(match="imb:job:*")) == []
        wait_until(lambda: _buffered(base_url) == 0, 10, what="the budget to be released")
        with httpx.Client(base_url=base_url, timeout=60) as client:
            accepted = client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
        assert accepted.status_code == 202 and accepted.json()["total"] == 30, accepted.text
    finally:
        api.stop()


def _buffered(base_url: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    return float(next(line for line in text.splitlines() if line.startswith("imbeddings_http_buffered_body_bytes ")).split()[1])
