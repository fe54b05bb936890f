"""Nothing is lost: a worker killed mid-chunk, and Redis restarted mid-job, with real processes."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from devtools.processes import ServiceProcess, wait_until
from devtools.redis_server import RedisServer
from shared.keys import Keys
from tests.conftest import service_env, start_api, start_worker, wait_served, wait_worker_ready
from tests.jobs_helpers import all_results, elapsed, submit, wait_done

VISIBILITY_S = 10
NAMES = ("cmp1.jpg", "cmp2.jpg", "cmp3.png", "cmp4.png", "img.webp")


@pytest.fixture
def stack_env(tmp_path: Path, allow_list: Path, tiny_models: dict[str, Path]) -> Iterator[tuple[RedisServer, dict[str, str]]]:
    server = RedisServer(tmp_path / "redis").start()
    model = str(tiny_models["vit-tiny"])
    env = service_env(
        server.url, allow_list, tiny_models,
        IMBEDDINGS_DEFAULT_MODEL=model, IMBEDDINGS_WORKER_MODELS=model,
        IMBEDDINGS_BROKER_VISIBILITY_TIMEOUT_S=str(VISIBILITY_S), IMBEDDINGS_JOB_CHUNK_SIZE="4", IMBEDDINGS_BULK_CONCURRENCY="1",
    )
    yield server, env
    server.stop(graceful=False)


def _job_under_way(client: httpx.Client, images: str, total: int) -> tuple[str, dict[str, list[float]]]:
    """A job of ``total`` slow URLs that has started and is far from done, and each photo's vector."""
    data = client.post("/v1/embeddings", json={"input": [f"{images}/{name}" for name in NAMES]}).json()["data"]
    expected = {name: item["embedding"] for name, item in zip(NAMES, data)}
    job_id = submit(client, {"input": [f"{images}/{NAMES[i % len(NAMES)]}" for i in range(total)]})["id"]
    wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["completed"] >= 8, 60, what="the job to be under way")
    return job_id, expected


def _check_every_item_once(client: httpx.Client, env: dict[str, str], job_id: str, total: int, expected: dict[str, list[float]]) -> None:
    state = client.get(f"/v1/jobs/{job_id}").json()
    assert (state["status"], state["completed"], state["failed"]) == ("completed", total, 0), state
    store = redis.Redis.from_url(env["IMBEDDINGS_REDIS_URL"])
    assert store.hlen(Keys("imb:").job_results(job_id)) == total
    items = all_results(client, job_id, page=1000)
    assert [item["index"] for item in items] == list(range(total))
    for item in items:
        assert np.allclose(item["embedding"], expected[NAMES[item["index"] % len(NAMES)]], atol=1e-6)


def test_worker_killed_mid_chunk(tmp_path: Path, stack_env: tuple[RedisServer, dict[str, str]], slow_images: str) -> None:
    _, env = stack_env
    model = env["IMBEDDINGS_DEFAULT_MODEL"]
    first = start_worker(env, tmp_path / "worker-a.log")
    api, base_url = start_api(env, tmp_path / "api.log")
    second: ServiceProcess | None = None
    try:
        wait_served(base_url, model, first)
        with httpx.Client(base_url=base_url, timeout=30) as client:
            total = 80
            job_id, expected = _job_under_way(client, slow_images, total)
            first.stop(signal.SIGKILL, timeout_s=10)
            killed = time.monotonic()
            at_kill = client.get(f"/v1/jobs/{job_id}").json()
            assert at_kill["status"] == "running" and at_kill["completed"] < total

            second = start_worker(env, tmp_path / "worker-b.log")
            wait_worker_ready(second)
            available = time.monotonic()
            wait_done(client, job_id, timeout_s=180)
            print(f"recovery: job completed {elapsed(available)} s after the second worker was up ({elapsed(killed)} s after the kill)")
            assert time.monotonic() - available < 180
            _check_every_item_once(client, env, job_id, total, expected)
    finally:
        api.stop()
        first.stop(signal.SIGKILL)
        if second is not None:
            second.stop()


@pytest.mark.parametrize("graceful", [True, False], ids=["shutdown", "sigkill"])
def test_redis_restarted_mid_job(tmp_path: Path, stack_env: tuple[RedisServer, dict[str, str]], slow_images: str, graceful: bool) -> None:
    """SHUTDOWN completes the append-only file; SIGKILL leaves it as the kernel had it: with
    ``appendfsync everysec`` Redis writes each command to the file before it answers, so a killed
    process (as opposed to a crashed host) loses nothing it acknowledged."""
    server, env = stack_env
    model = env["IMBEDDINGS_DEFAULT_MODEL"]
    worker = start_worker(env, tmp_path / "worker.log")
    api, base_url = start_api(env, tmp_path / "api.log")
    try:
        wait_served(base_url, model, worker)
        with httpx.Client(base_url=base_url, timeout=30) as client:
            total = 60
            job_id, expected = _job_under_way(client, slow_images, total)

            server.stop(graceful=graceful)
            down = time.monotonic()
            for path in (f"/v1/jobs/{job_id}", "/ready", "/v1/models"):
                started = time.monotonic()
                answer = client.get(path)
                assert answer.status_code == 503 and time.monotonic() - started < 5, (path, answer.text)
            refused = client.post("/v1/embeddings", json={"input": f"{slow_images}/cmp1.jpg"})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "queue_unavailable"
            time.sleep(2)

            server.start()  # same port, same data directory: it reloads the append-only file
            up = time.monotonic()
            wait_until(lambda: client.get(f"/v1/jobs/{job_id}").status_code == 200, 30, what="the API to recover")
            print(f"API answered again {elapsed(up)} s after Redis came back")
            wait_done(client, job_id, timeout_s=180)
            print(f"job completed {elapsed(up)} s after Redis came back ({elapsed(down)} s after it went away)")
            _check_every_item_once(client, env, job_id, total, expected)
            # The worker rode out the outage: its heartbeat resumes and it takes new work.
            wait_until(lambda: client.get("/ready").status_code == 200, 30, what="/ready after the restart")
            assert worker.alive()
            assert client.post("/v1/embeddings", json={"input": f"{slow_images}/cmp1.jpg"}).status_code == 200
    finally:
        api.stop()
        worker.stop()
