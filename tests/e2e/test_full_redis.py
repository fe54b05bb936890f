"""A full Redis (``maxmemory`` with ``noeviction``), with real Redis, worker and API processes.

Work is refused with 507 before Redis fills, a refused job leaves nothing behind, Redis's own OOM
refusal is a 507 too (never "unreachable"), a worker starts while Redis is full and frees it, and a
chunk whose results could not be stored is finished once Redis has room again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from devtools.photos import BENCH
from devtools.processes import wait_until
from devtools.redis_server import RedisServer
from shared.store.admission import LedgerKeys
from shared.store.jobs import JobKeys
from tests.support.images import data_uri
from tests.support.jobs import SMALL_CHUNKS, all_results, elapsed, submit, wait_done
from tests.support.stack import private_stack, running_redis, wait_served, wait_worker_ready

MAXMEMORY = 32 * 2**20
COFFEE = (BENCH / "coffee_1600x1200.jpg").read_bytes()  # 282 kB
JOB_KEYS = JobKeys("imb:")
FILLER = "test-filler:"


@pytest.fixture
def full_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis with a 32 MiB maxmemory and noeviction; the services on it keep the default memory
    budget (80% of maxmemory)."""
    with running_redis(tmp_path / "redis", extra_args=("--maxmemory", str(MAXMEMORY), "--maxmemory-policy", "noeviction")) as server:
        yield server


class Filler:
    """Keeps Redis at its maxmemory with filler keys until ``free()`` deletes them.

    Redis frees buffers of its own (a refused command's query buffer, client buffers) within a second
    of refusing a write, which would leave a few hundred kB of room: a thread tops the filler up
    every 20 ms, with smaller and smaller values, until even 64 more bytes are refused.
    """

    def __init__(self, store: redis.Redis) -> None:
        self._store = store
        self.written = 0
        self._stop = threading.Event()
        self._top_up()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _top_up(self) -> None:
        for size in (256 * 1024, 16 * 1024, 1024, 64):
            while True:
                try:
                    self._store.set(f"{FILLER}{self.written}", b"f" * size)
                except redis.OutOfMemoryError:
                    break
                self.written += 1

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._top_up()

    def stop(self) -> None:
        """Stop topping up; the filler keys stay."""
        self._stop.set()
        self._thread.join()

    def free(self) -> None:
        self.stop()
        for start in range(0, self.written, 500):
            self._store.delete(*[f"{FILLER}{i}" for i in range(start, min(self.written, start + 500))])


def _job_keys(store: redis.Redis) -> list[bytes]:
    return sorted(store.scan_iter(match="imb:job:*", count=1000)) + sorted(store.scan_iter(match="imb:blobs:*", count=1000))


def _used(store: redis.Redis) -> int:
    return int(store.info("memory")["used_memory"])


def _check_every_item_once(client: httpx.Client, store: redis.Redis, job_id: str, total: int) -> None:
    state = client.get(f"/v1/jobs/{job_id}").json()
    assert (state["status"], state["completed"], state["failed"]) == ("completed", total, 0), state
    assert store.hlen(JOB_KEYS.results(job_id)) == total
    assert not store.exists(JOB_KEYS.blobs(job_id))
    items = all_results(client, job_id, page=1000)
    assert [item["index"] for item in items] == list(range(total))
    assert all("embedding" in item for item in items)


def test_work_over_the_budget_gets_507_before_redis_fills(tmp_path: Path, full_redis: RedisServer, allow_list: Path, tiny_models: dict[str, Path]) -> None:
    """Default budget: 80% of maxmemory. A 28 MB job or request: 507 redis_full naming the
    budget, nothing stored; work that fits is accepted and done."""
    store = redis.Redis.from_url(full_redis.url)
    with private_stack(tmp_path, full_redis.url, allow_list, tiny_models) as stack, stack.client() as client:
        before = (store.dbsize(), _used(store))
        refused = client.post("/v1/jobs", json={"input": [data_uri(COFFEE)] * 100})
        print(f"100 x 282 kB job: {refused.status_code} {refused.json()}; Redis used {_used(store)} bytes of {MAXMEMORY} maxmemory")
        assert refused.status_code == 507 and refused.headers["Retry-After"]
        error = refused.json()["error"]
        assert error["code"] == "redis_full" and error["type"] == "insufficient_storage"
        assert "Redis has no room for this job" in error["message"] and "80% of Redis's maxmemory of 32.0 MiB" in error["message"]
        sync = client.post("/v1/embeddings", json={"input": [data_uri(COFFEE)] * 100})
        assert sync.status_code == 507 and sync.json()["error"]["code"] == "redis_full", sync.text[:300]
        assert _job_keys(store) == [] and store.dbsize() == before[0]
        assert _used(store) < before[1] + 2**20

        job = submit(client, {"input": [data_uri(COFFEE)] * 30})
        wait_done(client, job["id"])
        _check_every_item_once(client, store, job["id"], 30)
        assert client.post("/v1/embeddings", json={"input": [data_uri(COFFEE)] * 4}).status_code == 200


def test_redis_refusal_is_507_and_a_refused_job_leaves_nothing(tmp_path: Path, full_redis: RedisServer, allow_list: Path, tiny_models: dict[str, Path]) -> None:
    """With a budget above maxmemory, Redis itself refuses mid-submit (OOM): the answer is 507 (not
    503 "unreachable"), and every key the job or request wrote is gone."""
    store = redis.Redis.from_url(full_redis.url)
    with private_stack(tmp_path, full_redis.url, allow_list, tiny_models, IMBEDDINGS_REDIS_MAX_BYTES=str(2**30)) as stack, stack.client() as client:
        counts_before = store.hgetall(JOB_KEYS.counts())
        baseline = _used(store)
        refused = client.post("/v1/jobs", json={"input": [data_uri(COFFEE)] * 150})
        assert refused.status_code == 507, refused.text[:300]
        error = refused.json()["error"]
        assert error["code"] == "redis_full" and "maxmemory" in error["message"] and "nothing of it was kept" in error["message"]
        assert _job_keys(store) == []
        assert store.hgetall(JOB_KEYS.counts()) == counts_before

        sync = client.post("/v1/embeddings", json={"input": [data_uri(COFFEE)] * 150})
        assert sync.status_code == 507 and sync.json()["error"]["code"] == "redis_full", sync.text[:300]
        assert _job_keys(store) == []
        ledger = store.hget(LedgerKeys("imb:").admitted_images(stack.default_model), "total")
        assert ledger in (None, b"0")
        print(f"after two refused 42 MB submissions: used_memory {_used(store)} bytes (baseline {baseline}), keys {store.dbsize()}")
        assert _used(store) < baseline + 2**20
        # Redis has room again: the service works as before.
        assert client.post("/v1/embeddings", json={"input": [data_uri(COFFEE)] * 2}).status_code == 200


def test_worker_starts_while_redis_is_full_and_frees_it(tmp_path: Path, full_redis: RedisServer, allow_list: Path, tiny_models: dict[str, Path]) -> None:
    """Jobs wait with their images; Redis is then filled to its maxmemory. A worker started now
    comes up, is announced, and finishes every job: storing results drops the images first."""
    store = redis.Redis.from_url(full_redis.url)
    filler: Filler | None = None
    with private_stack(tmp_path, full_redis.url, allow_list, tiny_models, workers=0) as stack, stack.client() as client:
        try:
            jobs = [submit(client, {"input": [data_uri(COFFEE)] * 35})["id"] for _ in range(2)]
            filler = Filler(store)
            print(f"Redis full: used_memory {_used(store)} of {MAXMEMORY} ({filler.written} filler keys)")
            refused = client.post("/v1/jobs", json={"input": [data_uri(COFFEE)]})
            assert refused.status_code == 507 and refused.json()["error"]["code"] == "redis_full"

            worker = stack.add_worker()
            started = time.monotonic()
            wait_worker_ready(worker)
            wait_served(stack.base_url, stack.default_model, worker)
            print(f"worker ready and announced {elapsed(started)} s after it was started, Redis full")
            filler.stop()  # from now on, what the worker frees stays free
            full = _used(store)
            for job_id in jobs:
                wait_done(client, job_id, timeout_s=180)
                _check_every_item_once(client, store, job_id, 35)
            print(f"both jobs completed {elapsed(started)} s after the worker was started; used_memory {full} -> {_used(store)}")
            assert _used(store) < full - 10 * 2**20
            assert worker.alive()
            assert "Unrecoverable error" not in worker.log_text()
        finally:
            if filler is not None:
                filler.free()


def test_chunk_whose_store_hit_oom_is_finished_once_memory_frees(
    tmp_path: Path, full_redis: RedisServer, allow_list: Path, tiny_models: dict[str, Path], slow_images: str
) -> None:
    """A job of URLs (no image bytes to drop) is under way when Redis fills: its chunks' results are
    refused, the chunks are not acknowledged, and once memory frees every item is stored once."""
    store = redis.Redis.from_url(full_redis.url)
    filler: Filler | None = None
    with private_stack(tmp_path, full_redis.url, allow_list, tiny_models, **SMALL_CHUNKS) as stack, stack.client() as client:
        worker = stack.worker
        try:
            total = 40
            names = ("cmp1.jpg", "cmp2.jpg", "cmp3.png", "cmp4.png", "img.webp")
            job_id = submit(client, {"input": [f"{slow_images}/{names[i % len(names)]}" for i in range(total)]})["id"]
            wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["completed"] >= 4, 60, what="the job to be under way")
            filler = Filler(store)
            wait_until(lambda: "Redis refused or lost a job chunk's write" in worker.log_text(), 60, what="a chunk's store to be refused")
            at_full = client.get(f"/v1/jobs/{job_id}").json()
            assert at_full["status"] == "running" and at_full["completed"] < total, at_full
            sync = client.post("/v1/embeddings", json={"input": f"{slow_images}/cmp1.jpg"})
            assert sync.status_code == 507 and sync.json()["error"]["code"] == "redis_full", sync.text[:300]
            time.sleep(5)  # Redis stays full: nothing is stored, nothing acknowledged, nothing lost
            assert client.get(f"/v1/jobs/{job_id}").json()["completed"] == at_full["completed"]
            queue = [key for key in store.scan_iter(match="imbeddings.*.bulk")]
            held = store.hlen("unacked") + sum(store.llen(key) for key in queue)
            refusals = worker.log_text().count("Redis refused or lost a job chunk's write")
            print(
                f"Redis full for 5 s: {refusals} chunk stores refused, {held} chunk messages held (unacknowledged or queued),"
                f" completed stayed {at_full['completed']}"
            )
            assert held == (total - at_full["completed"]) // 4

            filler.free()
            freed = time.monotonic()
            wait_done(client, job_id, timeout_s=180)
            print(
                f"job completed {elapsed(freed)} s after memory was freed (visibility timeout 10 s);"
                f" {at_full['completed']} of {total} were done when Redis filled"
            )
            _check_every_item_once(client, store, job_id, total)
            wait_until(lambda: store.hlen("unacked") == 0, 30, what="no unacknowledged message left")
            assert worker.alive()
        finally:
            if filler is not None:
                filler.free()
