"""Small helpers the job tests share: submit, wait, read every result."""

from __future__ import annotations

import time

import httpx
import numpy as np
import redis

from devtools.processes import wait_until
from shared.store.jobs import JobKeys

# Photos a job cycles through, so each item's vector can be checked against its photo's.
NAMES = ("cmp1.jpg", "cmp2.jpg", "cmp3.png", "cmp4.png", "img.webp")
VISIBILITY_S = 10
CHUNK = 4
# Small chunks, one at a time per worker, and a visibility timeout a test can wait out.
SMALL_CHUNKS = {"IMBEDDINGS_BROKER_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S), "IMBEDDINGS_JOB_CHUNK_SIZE": str(CHUNK), "IMBEDDINGS_BULK_CONCURRENCY": "1"}


def submit(client: httpx.Client, body: dict) -> dict:
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def wait_done(client: httpx.Client, job_id: str, timeout_s: float = 120) -> dict:
    state: dict = {}

    def finished() -> bool:
        nonlocal state
        response = client.get(f"/v1/jobs/{job_id}")
        if response.status_code != 200:
            return False
        state = response.json()
        return state["status"] in ("completed", "cancelled")

    wait_until(finished, timeout_s, interval_s=0.2, what=f"job {job_id} to finish")
    return state


def all_results(client: httpx.Client, job_id: str, page: int = 100) -> list[dict]:
    items: list[dict] = []
    offset = 0
    while True:
        body = client.get(f"/v1/jobs/{job_id}/results", params={"offset": offset, "limit": page}).json()
        items += body["data"]
        if not body["has_more"]:
            return items
        offset += page


def elapsed(since: float) -> float:
    return round(time.monotonic() - since, 1)


def job_under_way(client: httpx.Client, images: str, total: int) -> tuple[str, dict[str, list[float]]]:
    """A job of ``total`` slow URLs that has started and is far from done, and each photo's vector."""
    data = client.post("/v1/embeddings", json={"input": [f"{images}/{name}" for name in NAMES]}).json()["data"]
    expected = {name: item["embedding"] for name, item in zip(NAMES, data)}
    job_id = submit(client, {"input": [f"{images}/{NAMES[i % len(NAMES)]}" for i in range(total)]})["id"]
    wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["completed"] >= 8, 60, what="the job to be under way")
    return job_id, expected


def check_every_item_once(client: httpx.Client, store: redis.Redis, job_id: str, total: int, expected: dict[str, list[float]]) -> None:
    state = client.get(f"/v1/jobs/{job_id}").json()
    assert (state["status"], state["completed"], state["failed"]) == ("completed", total, 0), state
    assert store.hlen(JobKeys("imb:").results(job_id)) == total
    items = all_results(client, job_id, page=1000)
    assert [item["index"] for item in items] == list(range(total))
    for item in items:
        assert np.allclose(item["embedding"], expected[NAMES[item["index"] % len(NAMES)]], atol=1e-6)
