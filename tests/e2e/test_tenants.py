"""Tenants: jobs belong to the key that made them, per-key quotas, key ids in logs and metrics,
job ids checked at the edge, /info guarded and redacted, jobs whose dimensions no model can give.

Real processes throughout: a second API with keys beside the shared service (same Redis, same
worker), and a private stack whose Redis has a password with an '@' in it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from devtools.photos import EXAMPLES
from devtools.redis_server import RedisServer
from shared.api_keys import derived_key_id
from shared.queues import queue_for
from shared.store.jobs import JobKeys, new_job_id
from shared.store.tenants import TenantKeys
from tests.support.images import data_uri
from tests.support.jobs import all_results, submit, wait_done
from tests.support.stack import IMAGE_HOST, Stack, private_stack, running_redis, start_api, wait_served

JPEG = (EXAMPLES / "cmp1.jpg").read_bytes()
SECRET_A = "sk-tenant-a-5f1e2d3c9b"
SECRET_B = "sk-bare-tenant-b-9a8b7c6d"  # a bare secret: its id is derived
ID_B = derived_key_id(SECRET_B)
QUOTA = 20
JOB_KEYS = JobKeys("imb:")
TENANT_KEYS = TenantKeys("imb:")


@pytest.fixture(scope="module")
def tenants(service: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A second API on the shared Redis and worker, with one named and one bare key (from a keys
    file) and a small per-key quota."""
    folder = tmp_path_factory.mktemp("tenants")
    log = folder / "api.log"
    keys_file = folder / "api-keys"
    keys_file.write_text(f"# tenants of this test\ntenant-a:{SECRET_A}\n{SECRET_B}\n")
    env = {**service.env, "IMBEDDINGS_API_KEYS_FILE": str(keys_file), "IMBEDDINGS_KEY_MAX_QUEUED_IMAGES": str(QUOTA)}
    api, base_url = start_api(env, log)
    yield base_url, log
    api.stop()


def _client(base_url: str, secret: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    return httpx.Client(base_url=base_url, timeout=60, headers=headers)


def _not_found_message(response: httpx.Response, job_id: str) -> str:
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["code"] == "job_not_found" and error["type"] == "not_found_error", error
    return error["message"].replace(job_id, "<id>")


def test_jobs_belong_to_the_key_that_created_them(service: Stack, tenants: tuple[str, Path]) -> None:
    base_url, _ = tenants
    with _client(base_url, SECRET_A) as a, _client(base_url, SECRET_B) as b:
        job = submit(a, {"input": [data_uri(JPEG)] * 3})
        job_id = job["id"]
        wait_done(a, job_id)
        made_up = new_job_id()
        expected = _not_found_message(b.get(f"/v1/jobs/{made_up}"), made_up)
        # Key B cannot read, page, stream or delete A's job, and cannot tell it from a made-up id.
        for method, path in (("GET", ""), ("GET", "/results"), ("GET", "/results.jsonl"), ("DELETE", "")):
            answer = b.request(method, f"/v1/jobs/{job_id}{path}")
            assert _not_found_message(answer, job_id) == expected, (method, path)
        # A's job is untouched by B's DELETE.
        assert a.get(f"/v1/jobs/{job_id}").json()["status"] == "completed"
        assert len(all_results(a, job_id)) == 3 and len(a.get(f"/v1/jobs/{job_id}/results.jsonl").text.splitlines()) == 3

        job_b = submit(b, {"input": ["ftp://nowhere/x.jpg"]})
        assert wait_done(b, job_b["id"])["failed"] == 1
        assert a.get(f"/v1/jobs/{job_b['id']}").status_code == 404

    # The record holds the key id, never the secret.
    store = redis.Redis.from_url(service.env["IMBEDDINGS_REDIS_URL"])
    record = store.hgetall(JOB_KEYS.job(job_id))
    assert record[b"owner"] == b"tenant-a" and store.hget(JOB_KEYS.job(job_b["id"]), "owner") == ID_B.encode()
    assert not any(SECRET_A.encode() in value for value in record.values())

    # A job made where no keys are configured belongs to nobody with a key, and the other way round.
    with service.client() as anonymous, _client(base_url, SECRET_A) as a:
        open_job = submit(anonymous, {"input": ["ftp://nowhere/x.jpg"]})
        assert a.get(f"/v1/jobs/{open_job['id']}").status_code == 404
        assert anonymous.get(f"/v1/jobs/{job_id}").status_code == 404
        a.delete(f"/v1/jobs/{job_id}")


def test_logs_and_metrics_name_the_key_never_the_secret(tenants: tuple[str, Path]) -> None:
    base_url, log = tenants
    with _client(base_url, SECRET_A) as a, _client(base_url, SECRET_B) as b, _client(base_url, None) as nobody:
        assert a.post("/v1/embeddings", json={"input": data_uri(JPEG)}).status_code == 200
        assert b.get("/v1/models").status_code == 200
        assert nobody.get("/v1/models").status_code == 401
        metrics = nobody.get("/metrics")  # open on purpose: Prometheus scrapes it without a key
        assert metrics.status_code == 200
    text = metrics.text
    assert 'key="tenant-a"' in text and f'key="{ID_B}"' in text
    assert SECRET_A not in text and SECRET_B not in text
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    access = [line for line in lines if line.get("logger") == "api.access"]
    assert {"tenant-a", ID_B} <= {line["key"] for line in access}
    assert any(line["route"] == "/v1/models" and line["status"] == 401 and line["key"] == "" for line in access)
    raw = log.read_text()
    assert SECRET_A not in raw and SECRET_B not in raw


def test_info_needs_a_key_when_keys_are_configured(tenants: tuple[str, Path]) -> None:
    base_url, _ = tenants
    with _client(base_url, None) as nobody, _client(base_url, SECRET_B) as b:
        refused = nobody.get("/info")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "missing_api_key"
        info = b.get("/info")
        assert info.status_code == 200
        settings = info.json()["settings"]
        assert settings["api_keys_configured"] == 2 and settings["key_max_queued_images"] == QUOTA
        assert SECRET_A not in info.text and SECRET_B not in info.text
        assert nobody.get("/health").status_code == 200  # probes stay open


@pytest.mark.parametrize("suffix", [":results", ":blobs", "0", "x"])
def test_malformed_job_ids_are_404_not_500(service: Stack, suffix: str) -> None:
    with service.client() as client:
        job_id = submit(client, {"input": ["ftp://nowhere/x.jpg"]})["id"]
        wait_done(client, job_id)
        for bad in (f"{job_id}{suffix}", job_id.upper(), job_id[:-1], "job_" + "g" * 24):
            for method, path in (("GET", ""), ("GET", "/results"), ("GET", "/results.jsonl"), ("DELETE", "")):
                answer = client.request(method, f"/v1/jobs/{bad}{path}")
                _not_found_message(answer, bad)
        assert client.get(f"/v1/jobs/{job_id}").status_code == 200  # nothing was deleted by the tries


def _quota_total(store: redis.Redis, key_id: str) -> int:
    return int(store.hget(TENANT_KEYS.images(key_id), "total") or 0)


def test_key_quota_counts_requests_and_jobs(service: Stack, tenants: tuple[str, Path]) -> None:
    base_url, _ = tenants
    store = redis.Redis.from_url(service.env["IMBEDDINGS_REDIS_URL"])
    waiting = service.model("unserved")  # its jobs stay queued: no worker serves it
    served = service.model("dinov2-tiny")
    with _client(base_url, SECRET_A) as a, _client(base_url, SECRET_B) as b:
        held = submit(a, {"model": waiting, "input": [data_uri(JPEG)] * 12})
        assert _quota_total(store, "tenant-a") == 12
        full = a.post("/v1/jobs", json={"model": waiting, "input": [data_uri(JPEG)] * 12})
        assert full.status_code == 429, full.text
        error = full.json()["error"]
        assert error["code"] == "key_quota_exceeded" and "12 images queued" in error["message"] and f"limit of {QUOTA}" in error["message"]
        assert int(full.headers["retry-after"]) >= 1
        # The other key is not held up by A's queue.
        other = submit(b, {"model": waiting, "input": [data_uri(JPEG)] * 12})
        too_big = a.post("/v1/jobs", json={"model": served, "input": ["ftp://nowhere/x.jpg"] * (QUOTA + 1)})
        assert too_big.status_code == 400 and too_big.json()["error"]["code"] == "exceeds_key_quota"

        # Synchronous requests count too, while they wait, and leave when answered.
        sync_full = a.post("/v1/embeddings", json={"model": served, "input": [data_uri(JPEG)] * 9})
        assert sync_full.status_code == 429 and sync_full.json()["error"]["code"] == "key_quota_exceeded"
        assert a.post("/v1/embeddings", json={"model": served, "input": [data_uri(JPEG)] * 8}).status_code == 200
        assert _quota_total(store, "tenant-a") == 12

        # Cancelling gives the images back.
        assert a.delete(f"/v1/jobs/{held['id']}").status_code == 200
        assert _quota_total(store, "tenant-a") == 0
        # Finished items leave the quota as they finish; a completed job leaves it altogether.
        for _ in range(2):
            done = submit(a, {"model": served, "input": [data_uri(JPEG)] * QUOTA})
            assert wait_done(a, done["id"])["completed"] == QUOTA
            assert _quota_total(store, "tenant-a") == 0
        assert b.delete(f"/v1/jobs/{other['id']}").status_code == 200
    assert _quota_total(store, ID_B) == 0 and store.zcard(TENANT_KEYS.work("tenant-a")) == 0
    store.delete(queue_for(waiting, "bulk"))  # the cancelled jobs' chunks, which no worker would take


def test_key_quota_entries_lapse_with_their_jobs(service: Stack, tmp_path: Path) -> None:
    """A job that expires unfinished (no worker ever took it) stops counting when it expires."""
    secret = "sk-expiring-tenant-c-0d9e8f"
    env = {**service.env, "IMBEDDINGS_API_KEYS": f"tenant-c:{secret}", "IMBEDDINGS_KEY_MAX_QUEUED_IMAGES": str(QUOTA), "IMBEDDINGS_JOB_RESULT_TTL_S": "2"}
    api, base_url = start_api(env, tmp_path / "api.log")
    waiting = service.model("unserved")
    try:
        with _client(base_url, secret) as c:
            submit(c, {"model": waiting, "input": [data_uri(JPEG)] * 15})
            assert c.post("/v1/jobs", json={"model": waiting, "input": [data_uri(JPEG)] * 15}).status_code == 429
            time.sleep(3.5)
            submit(c, {"model": waiting, "input": [data_uri(JPEG)] * 15})
    finally:
        api.stop()
        redis.Redis.from_url(service.env["IMBEDDINGS_REDIS_URL"]).delete(queue_for(waiting, "bulk"))


PASSWORD = "t-P4ss@word"


@pytest.fixture
def passworded_stack(tmp_path: Path, allow_list: Path, tiny_models: dict[str, Path]) -> Iterator[tuple[RedisServer, Stack]]:
    """Its own Redis, with a password containing '@', and an API; no worker yet."""
    with running_redis(tmp_path / "redis", password=PASSWORD) as store, private_stack(tmp_path, store.url, allow_list, tiny_models, workers=0) as stack:
        yield store, stack


def test_dimensions_beyond_the_model_fail_the_items_never_the_read(passworded_stack: tuple[RedisServer, Stack]) -> None:
    store, stack = passworded_stack
    model = stack.default_model
    with stack.client() as client:
        info = client.get("/info").json()["settings"]
        assert info["redis_url"] == f"redis://***@127.0.0.1:{store.port}/0" and "P4ss" not in json.dumps(info) and "word" not in info["redis_url"]
        # No worker has described the model yet, so the API cannot check the dimensions at submit.
        inputs = [data_uri(JPEG)] * 20 + ["ftp://nowhere/x.jpg"]
        job = submit(client, {"input": inputs, "dimensions": 999})
        worker = stack.add_worker()
        try:
            wait_served(stack.base_url, model, worker)
            state = wait_done(client, job["id"])
            assert (state["status"], state["completed"], state["failed"]) == ("completed", 0, 21)
            items = all_results(client, job["id"], page=7)
            assert [item["index"] for item in items] == list(range(21))
            dims = [item for item in items if item["error"]["code"] == "invalid_dimensions"]
            assert len(dims) == 20 and "dimensions=999 is larger than the model's embedding size 32" in dims[0]["error"]["message"]
            stream = client.get(f"/v1/jobs/{job['id']}/results.jsonl")
            assert stream.status_code == 200 and [json.loads(line) for line in stream.text.splitlines()] == items
            # Now that the model is known, the API refuses such a job at once.
            refused = client.post("/v1/jobs", json={"input": [data_uri(JPEG)], "dimensions": 999})
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "dimensions"
            fine = submit(client, {"input": [data_uri(JPEG)] * 2, "dimensions": 8})
            assert wait_done(client, fine["id"])["completed"] == 2 and len(all_results(client, fine["id"])[0]["embedding"]) == 8
        finally:
            worker.stop()
        assert PASSWORD not in worker.log_text() and "P4ss" not in worker.log_text()
        assert "P4ss" not in stack.api.log_text()
        assert "TypeError" not in worker.log_text()


def test_default_key_quota_holds_two_maximal_jobs(service: Stack, tmp_path: Path) -> None:
    """With the default quota and job size a key may queue two jobs of the most images a job may
    have (2 x 100,000); the next image waits for room. (Large chunks only make the 200,000 images
    quick to publish: the quota does not depend on them.)"""
    secret = "sk-bulk-tenant-d-4c3b2a19"
    env = {**service.env, "IMBEDDINGS_API_KEYS": f"bulk:{secret}", "IMBEDDINGS_JOB_CHUNK_SIZE": "10000"}
    api, base_url = start_api(env, tmp_path / "api.log")
    waiting = service.model("unserved")
    store = redis.Redis.from_url(service.env["IMBEDDINGS_REDIS_URL"])
    try:
        with _client(base_url, secret) as client:
            limit = client.get("/info").json()["settings"]["key_max_queued_images"]
            maximal = client.get("/info").json()["settings"]["max_job_inputs"]
            assert (limit, maximal) == (200_000, 100_000)
            urls = [f"http://{IMAGE_HOST}/{i}.jpg" for i in range(maximal)]
            started = time.monotonic()
            jobs = [submit(client, {"model": waiting, "input": urls}) for _ in range(2)]
            print(f"two jobs of {maximal} images submitted in {time.monotonic() - started:.1f} s")
            refused = client.post("/v1/jobs", json={"model": waiting, "input": urls[:1]})
            assert refused.status_code == 429 and f"{limit} images queued" in refused.json()["error"]["message"]
            for job in jobs:
                assert client.delete(f"/v1/jobs/{job['id']}").status_code == 200
            assert _quota_total(store, "bulk") == 0
            assert client.delete(f"/v1/jobs/{submit(client, {'model': waiting, 'input': urls[:1]})['id']}").status_code == 200
    finally:
        api.stop()
        store.delete(queue_for(waiting, "bulk"))


def test_stored_vectors_shorter_than_the_jobs_dimensions_fail_items_not_reads(service: Stack) -> None:
    """Results stored without the worker's check (by a worker from before it) still read: the
    items say what is wrong, the pages and the JSONL answer 200."""
    store = redis.Redis.from_url(service.env["IMBEDDINGS_REDIS_URL"])
    with service.client() as client:
        job = submit(client, {"input": [data_uri(JPEG)] * 3 + ["ftp://nowhere/x.jpg"]})
        assert wait_done(client, job["id"])["completed"] == 3
        store.hset(JOB_KEYS.job(job["id"]), "dimensions", 999)
        page = client.get(f"/v1/jobs/{job['id']}/results")
        assert page.status_code == 200, page.text
        codes = [item["error"]["code"] for item in page.json()["data"]]
        assert codes == ["invalid_dimensions"] * 3 + ["invalid_url"]
        stream = client.get(f"/v1/jobs/{job['id']}/results.jsonl")
        assert stream.status_code == 200 and [json.loads(line) for line in stream.text.splitlines()] == page.json()["data"]
