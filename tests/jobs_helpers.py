"""Small helpers the job tests share: submit, wait, read every result."""

from __future__ import annotations

import time

import httpx

from devtools.processes import wait_until


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
