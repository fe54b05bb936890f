"""Async jobs through the real service: submit, poll, page, stream, cancel, expire."""

from __future__ import annotations

import base64
import json
import time

import httpx
import numpy as np
import pytest
import redis

from devtools.photos import EXAMPLES
from devtools.processes import wait_until
from shared.store.jobs import STORE_RESULTS, JobKeys, job_created_at, new_job_id
from shared.store.tenants import TenantKeys
from tests.support.images import ImageServer, data_uri
from tests.support.jobs import all_results, submit, wait_done
from tests.support.stack import Stack, start_api

JPEG = (EXAMPLES / "cmp1.jpg").read_bytes()
PNG = (EXAMPLES / "cmp3.png").read_bytes()


def test_job_lifecycle_with_failures_in_place(service: Stack, image_server: ImageServer) -> None:
    inputs = []
    for i in range(40):
        inputs.append(image_server.url("cmp2.jpg") if i % 3 == 0 else data_uri(JPEG if i % 2 else PNG))
    inputs[7] = data_uri(b"definitely not an image")  # fails in the worker
    inputs[11] = "ftp://example.com/x.jpg"  # fails the API's form check: still only this item
    with service.client() as client:
        accepted = submit(client, {"input": inputs})
        assert accepted["object"] == "embedding.job" and accepted["total"] == 40 and accepted["status"] in ("queued", "running")
        assert job_created_at(accepted["id"]) == pytest.approx(time.time(), abs=5)
        state = wait_done(client, accepted["id"])
        assert (state["status"], state["completed"], state["failed"], state["total"]) == ("completed", 38, 2, 40)
        assert state["finished_at"] >= state["created_at"]

        items = all_results(client, accepted["id"], page=7)
        assert [item["index"] for item in items] == list(range(40))
        assert items[7]["error"]["code"] == "invalid_image" and "embedding" not in items[7]
        assert items[11]["error"]["code"] == "invalid_url"
        sync = client.post("/v1/embeddings", json={"input": [data_uri(JPEG), data_uri(PNG), image_server.url("cmp2.jpg")]}).json()["data"]
        for index, expected in ((1, sync[0]), (2, sync[1]), (3, sync[2])):
            assert np.allclose(items[index]["embedding"], expected["embedding"], atol=1e-6)

        page = client.get(f"/v1/jobs/{accepted['id']}/results", params={"offset": 35, "limit": 10}).json()
        assert [item["index"] for item in page["data"]] == [35, 36, 37, 38, 39] and page["has_more"] is False
        assert client.get(f"/v1/jobs/{accepted['id']}/results", params={"offset": 0, "limit": 5}).json()["has_more"] is True

        stream = client.get(f"/v1/jobs/{accepted['id']}/results.jsonl")
        assert stream.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in stream.text.splitlines()]
        assert lines == items


def test_job_applies_pooling_encoding_and_dimensions(service: Stack) -> None:
    with service.client() as client:
        job = submit(client, {"input": [data_uri(JPEG)] * 3, "pooling": "mean", "encoding_format": "base64", "dimensions": 16})
        wait_done(client, job["id"])
        item = all_results(client, job["id"])[0]
        vector = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
        assert vector.shape == (16,) and item["embedding"] == item["embeddings"]["mean"]
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)


def test_large_job_is_split_across_chunks(service: Stack, image_server: ImageServer) -> None:
    inputs = [image_server.url(name) for name in ("cmp1.jpg", "cmp2.jpg", "cmp3.png", "cmp4.png", "img.webp")] * 60
    with service.client() as client:
        job = submit(client, {"model": service.model("vit-tiny"), "input": inputs})
        state = wait_done(client, job["id"], timeout_s=180)
        assert (state["completed"], state["failed"]) == (300, 0)
        items = all_results(client, job["id"], page=1000)
        assert [item["index"] for item in items] == list(range(300))
        first, sixth = np.array(items[0]["embedding"]), np.array(items[5]["embedding"])
        assert np.allclose(first, sixth, atol=1e-6)  # same URL, same vector


def test_cancel_deletes_results(service: Stack) -> None:
    with service.client() as client:
        job = submit(client, {"input": [data_uri(JPEG)] * 64})
        cancelled = client.delete(f"/v1/jobs/{job['id']}")
        assert cancelled.status_code == 200 and cancelled.json()["status"] in ("cancelled", "completed")
        gone = client.get(f"/v1/jobs/{job['id']}/results")
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "job_results_deleted"
        assert client.get(f"/v1/jobs/{job['id']}/results.jsonl").status_code == 404
        time.sleep(1)  # chunks still queued at cancel time are skipped, not counted
        after = client.get(f"/v1/jobs/{job['id']}").json()
        assert after["status"] == cancelled.json()["status"] and after["completed"] + after["failed"] <= 64


def test_unknown_and_expired_ids(service: Stack) -> None:
    with service.client() as client:
        unknown = client.get(f"/v1/jobs/{new_job_id()}")
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "job_not_found"
        old = f"job_{int(time.time()) - 3 * 86400:08x}{'0' * 16}"
        expired = client.get(f"/v1/jobs/{old}")
        assert expired.status_code == 404 and expired.json()["error"]["code"] == "job_expired"
        assert "expired" in expired.json()["error"]["message"]
        assert client.delete(f"/v1/jobs/{new_job_id()}").status_code == 404


def test_results_really_expire(service: Stack, tmp_path) -> None:
    """A second API with a 2 s retention: once the job's keys lapse it answers 404 'expired'."""
    api, base_url = start_api({**service.env, "IMBEDDINGS_JOB_RESULT_TTL_S": "2"}, tmp_path / "api.log")
    try:
        with httpx.Client(base_url=base_url, timeout=30) as client:
            job = submit(client, {"input": ["ftp://nowhere/x.jpg"]})  # refused in place: done at once
            assert wait_done(client, job["id"])["failed"] == 1
            wait_until(lambda: client.get(f"/v1/jobs/{job['id']}").status_code == 404, 10, what="the job to expire")
            answer = client.get(f"/v1/jobs/{job['id']}").json()["error"]
            assert answer["code"] == "job_expired" and "kept for 2 s" in answer["message"]
    finally:
        api.stop()


def test_duplicate_delivery_counts_each_item_once(service: Stack) -> None:
    """The store script run twice for the same items (a redelivered chunk) changes nothing."""
    r = redis.Redis.from_url(service.env["IMBEDDINGS_REDIS_URL"])
    keys, tenants = JobKeys("imb:"), TenantKeys("imb:")
    job_id = new_job_id()
    r.hset(
        keys.job(job_id), mapping={"id": job_id, "status": "queued", "model": "m", "total": 3, "completed": 0, "failed": 0, "created_at": 0, "finished_at": ""}
    )
    store = r.register_script(STORE_RESULTS)
    script_keys = [keys.job(job_id), keys.results(job_id), f"test-counts:{job_id}", tenants.work(job_id), tenants.images(job_id)]
    args = [3600, 1, 0, '{"index":0}', 0, 1, '{"index":1,"error":{}}', 1]
    assert store(keys=script_keys, args=args)[:3] == [1, 1, 3]
    assert store(keys=script_keys, args=args)[:3] == [1, 1, 3]
    final = store(keys=script_keys, args=[3600, 2, 2, '{"index":2}', 0, *args[2:]])
    assert final == [2, 1, 3, b"completed"]
    assert r.hlen(keys.results(job_id)) == 3
    assert r.hgetall(f"test-counts:{job_id}") == {b"queued": b"-1", b"running": b"0", b"completed": b"1"}


def test_job_input_limit_and_model_checks(service: Stack) -> None:
    with service.client() as client:
        assert client.post("/v1/jobs", json={"model": "nobody/nothing", "input": [data_uri(JPEG)]}).status_code == 404
        assert client.post("/v1/jobs", json={"input": []}).status_code == 400
        too_wide = client.post("/v1/jobs", json={"input": [data_uri(JPEG)], "dimensions": 999})
        assert too_wide.status_code == 400 and too_wide.json()["error"]["param"] == "dimensions"


def test_job_answers_show_what_clients_see_and_nothing_stored_beside_it(service: Stack) -> None:
    """Submit, status and cancel answer the same fields in the same order; how the results are
    presented and whose the job is stay in Redis."""
    fields = ["id", "object", "status", "model", "total", "completed", "failed", "created_at", "finished_at"]
    with service.client() as client:
        job = submit(client, {"input": [data_uri(JPEG)] * 3, "pooling": "mean", "encoding_format": "base64", "dimensions": 8})
        assert list(job) == fields and (job["object"], job["total"], job["finished_at"]) == ("embedding.job", 3, None)
        status = client.get(f"/v1/jobs/{job['id']}").json()
        assert list(status) == fields and status["id"] == job["id"]
        cancelled = client.delete(f"/v1/jobs/{job['id']}").json()
        assert list(cancelled) == fields and cancelled["finished_at"] is not None
