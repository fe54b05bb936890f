"""A synchronous request whose worker dies (SIGKILL) or freezes (SIGSTOP) is answered within its
deadline by another worker, with the default heartbeat, visibility and request timeouts."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from devtools.processes import ServiceProcess, wait_until
from devtools.redis_server import RedisServer
from tests.support.images import serve_photos
from tests.support.stack import private_stack

DEFAULTS = ("IMBEDDINGS_HEARTBEAT_INTERVAL_S", "IMBEDDINGS_HEARTBEAT_TTL_S")


@pytest.fixture
def two_workers(
    tmp_path: Path, own_redis: RedisServer, allow_list: Path, tiny_models: dict[str, Path]
) -> Iterator[tuple[str, list[ServiceProcess], redis.Redis]]:
    with private_stack(tmp_path, own_redis.url, allow_list, tiny_models, workers=2, unset=DEFAULTS) as stack:
        yield stack.base_url, stack.workers, redis.Redis.from_url(own_redis.url)


def _holder(store: redis.Redis, workers: list[ServiceProcess]) -> ServiceProcess:
    """The worker that claimed the only request in flight (its claim names it by pid)."""
    claimed: list[bytes] = []

    def found() -> bool:
        claimed[:] = [store.get(key) for key in store.keys("imb:claim:*")]
        return bool(claimed) and claimed[0] is not None

    wait_until(found, 20, what="a worker to claim the request")
    pid = int(claimed[0].decode().split("@")[0].removeprefix("worker-"))
    return next(worker for worker in workers if worker.pid == pid)


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_request_survives_the_loss_of_its_worker(two_workers: tuple[str, list[ServiceProcess], redis.Redis], stop: signal.Signals) -> None:
    base_url, workers, store = two_workers
    with serve_photos(delay_s=6) as slow, ThreadPoolExecutor(max_workers=1) as pool:
        started = time.monotonic()
        answer = pool.submit(httpx.post, f"{base_url}/v1/embeddings", json={"input": f"{slow}/cmp1.jpg"}, timeout=90)
        holder = _holder(store, workers)
        os.kill(holder.pid, stop)
        lost = time.monotonic()
        response = answer.result()
    print(f"{stop.name}: answered {time.monotonic() - lost:.1f} s after its worker was lost ({time.monotonic() - started:.1f} s in all)")
    assert response.status_code == 200, response.text
    survivor = next(worker for worker in workers if worker is not holder)
    assert '"message": "request embedded"' in survivor.log_text()
