"""Nothing is lost: a worker killed mid-chunk, Redis restarted (or SIGKILLed) mid-job, and a Sentinel
failover mid-job, with real processes."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from devtools.processes import wait_until
from devtools.redis_server import RedisServer, SentinelServer
from shared.redis_client import sync_client
from shared.store.jobs import JobKeys
from tests.support.jobs import SMALL_CHUNKS, VISIBILITY_S, check_every_item_once, elapsed, job_under_way, wait_done
from tests.support.stack import private_stack, wait_worker_ready


def test_worker_killed_mid_chunk(tmp_path: Path, own_redis: RedisServer, allow_list: Path, tiny_models: dict[str, Path], slow_images: str) -> None:
    with private_stack(tmp_path, own_redis.url, allow_list, tiny_models, **SMALL_CHUNKS) as stack, stack.client(timeout=30) as client:
        total = 80
        job_id, expected = job_under_way(client, slow_images, total)
        stack.worker.stop(signal.SIGKILL, timeout_s=10)
        killed = time.monotonic()
        at_kill = client.get(f"/v1/jobs/{job_id}").json()
        assert at_kill["status"] == "running" and at_kill["completed"] < total

        second = stack.add_worker()
        wait_worker_ready(second)
        available = time.monotonic()
        wait_done(client, job_id, timeout_s=180)
        print(f"recovery: job completed {elapsed(available)} s after the second worker was up ({elapsed(killed)} s after the kill)")
        assert time.monotonic() - available < 180
        check_every_item_once(client, redis.Redis.from_url(own_redis.url), job_id, total, expected)


@pytest.mark.parametrize("graceful", [True, False], ids=["shutdown", "sigkill"])
def test_redis_restarted_mid_job(
    tmp_path: Path, own_redis: RedisServer, allow_list: Path, tiny_models: dict[str, Path], slow_images: str, graceful: bool
) -> None:
    """SHUTDOWN completes the append-only file; SIGKILL leaves it as the kernel had it: with
    ``appendfsync everysec`` Redis writes each command to the file before it answers, so a killed
    process (as opposed to a crashed host) loses nothing it acknowledged."""
    server = own_redis
    with private_stack(tmp_path, server.url, allow_list, tiny_models, **SMALL_CHUNKS) as stack, stack.client(timeout=30) as client:
        total = 60
        job_id, expected = job_under_way(client, slow_images, total)

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
        check_every_item_once(client, redis.Redis.from_url(own_redis.url), job_id, total, expected)
        # The worker rode out the outage: its heartbeat resumes and it takes new work.
        wait_until(lambda: client.get("/ready").status_code == 200, 30, what="/ready after the restart")
        assert stack.worker.alive()
        assert client.post("/v1/embeddings", json={"input": f"{slow_images}/cmp1.jpg"}).status_code == 200


# How long the Sentinels wait before calling a silent primary down. Sentinel's default is 30 s; the
# 503 window of a failover is this plus the Sentinels' election (README, "Nothing is lost").
DOWN_AFTER_MS = 2000
MASTER = "imb-primary"


@dataclass
class SentinelGroup:
    primary: RedisServer
    replica: RedisServer
    sentinels: list[SentinelServer]

    @property
    def url(self) -> str:
        return "sentinel://" + ",".join(sentinel.address for sentinel in self.sentinels) + "/0"

    def promoted(self) -> bool:
        """All Sentinels name the replica as the primary."""
        return all(sentinel.primary_address() == (self.replica.host, self.replica.port) for sentinel in self.sentinels)


@pytest.fixture
def sentinel_group(tmp_path: Path) -> Iterator[SentinelGroup]:
    primary = RedisServer(tmp_path / "primary").start()
    replica = RedisServer(tmp_path / "replica", replica_of=primary).start()
    sentinels: list[SentinelServer] = []
    try:
        replica.wait_replicating()
        for i in range(3):
            sentinels.append(SentinelServer(tmp_path / f"sentinel-{i}", primary, MASTER, down_after_ms=DOWN_AFTER_MS, failover_timeout_ms=10_000).start())
        for sentinel in sentinels:
            sentinel.wait_watching(replicas=1, other_sentinels=2)
        yield SentinelGroup(primary, replica, sentinels)
    finally:
        for server in (*sentinels, primary, replica):
            server.stop(graceful=False)


class Poller(threading.Thread):
    """Asks the API for a path every 0.1 s and records when each status came back."""

    def __init__(self, base_url: str, path: str) -> None:
        super().__init__(daemon=True)
        self.base_url, self.path = base_url, path
        self.seen: list[tuple[float, int | str]] = []
        self.done = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=10) as client:
            while not self.done.is_set():
                # The time the answer came back, taken after it did (a poll sent just before the
                # kill and answered 503 just after it belongs after the kill).
                try:
                    status: int | str = client.get(self.path).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                self.seen.append((time.monotonic(), status))
                time.sleep(0.1)

    def stop(self) -> None:
        self.done.set()
        self.join(15)


class Submitter(threading.Thread):
    """Submits a one-image job every 0.1 s and keeps the ids of those the API accepted (202)."""

    def __init__(self, base_url: str, image_url: str) -> None:
        super().__init__(daemon=True)
        self.base_url, self.image_url = base_url, image_url
        self.accepted: list[str] = []
        self.statuses: set[int | str] = set()
        self.done = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=10) as client:
            while not self.done.is_set():
                try:
                    answer = client.post("/v1/jobs", json={"input": [self.image_url]})
                    self.statuses.add(answer.status_code)
                    if answer.status_code == 202:
                        self.accepted.append(answer.json()["id"])
                except httpx.HTTPError as exc:
                    self.statuses.add(type(exc).__name__)
                time.sleep(0.1)

    def stop(self) -> None:
        self.done.set()
        self.join(15)


class AckedWriter(threading.Thread):
    """Appends 0, 1, 2, ... to a list through the workers' own client kind (Sentinel-aware, retrying)
    and remembers which appends Redis acknowledged: after a failover, the acknowledged appends the new
    primary lacks are the writes it lost."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.client = sync_client(url, sentinel_master=MASTER)
        self.acknowledged: list[int] = []
        self.last_acknowledged_at = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.done.is_set():
            try:
                self.client.rpush("acked-writes", n)
                self.acknowledged.append(n)
                self.last_acknowledged_at = time.monotonic()
            except redis.RedisError:
                pass
            n += 1

    def stop(self) -> None:
        self.done.set()
        self.join(90)


def unfinished_after(client: httpx.Client, job_ids: list[str], timeout_s: float) -> list[str]:
    """The jobs not completed once ``timeout_s`` has passed (or none, as soon as all are)."""
    deadline = time.monotonic() + timeout_s
    pending = list(job_ids)
    while pending and time.monotonic() < deadline:
        pending = [job for job in pending if client.get(f"/v1/jobs/{job}").json().get("status") != "completed"]
        time.sleep(0.5)
    return pending


def test_sentinel_failover_mid_job(tmp_path: Path, sentinel_group: SentinelGroup, allow_list: Path, tiny_models: dict[str, Path], slow_images: str) -> None:
    writer = AckedWriter(sentinel_group.url)
    poller: Poller | None = None
    with private_stack(tmp_path, sentinel_group.url, allow_list, tiny_models, IMBEDDINGS_REDIS_SENTINEL_MASTER=MASTER, **SMALL_CHUNKS) as stack:
        submitter = Submitter(stack.base_url, f"{slow_images}/cmp2.jpg")
        try:
            with stack.client(timeout=30) as client:
                total = 60
                job_id, expected = job_under_way(client, slow_images, total)
                poller = Poller(stack.base_url, f"/v1/jobs/{job_id}")
                for thread in (poller, submitter, writer):
                    thread.start()
                time.sleep(1)

                sentinel_group.primary.stop(graceful=False)
                killed = time.monotonic()
                completed_at_kill = int(sentinel_group.replica.client().hget(JobKeys("imb:").job(job_id), "completed") or 0)
                wait_until(sentinel_group.promoted, 60, interval_s=0.1, what="the Sentinels to promote the replica")
                promoted = time.monotonic()
                # The write in flight at the kill is retried through the Sentinels and lands on the new primary
                # within the client's backoff (2 s at most between tries), not after its minute of retries.
                wait_until(lambda: writer.last_acknowledged_at > promoted, 15, what="the writer's retried write to reach the new primary")
                writer.stop()
                wait_until(lambda: client.get(f"/v1/jobs/{job_id}").status_code == 200, 30, what="the API to recover")
                time.sleep(1)
                submitter.stop()
                wait_done(client, job_id, timeout_s=120)
                completed = time.monotonic()
                poller.stop()
                missing = [small for small in submitter.accepted if client.get(f"/v1/jobs/{small}").status_code == 404]
                stuck = unfinished_after(client, submitter.accepted, 3 * VISIBILITY_S)

                outages = [at for at, status in poller.seen if status != 200]
                statuses = {status for _, status in poller.seen}
                first_200_after = min(at for at, status in poller.seen if status == 200 and at > killed)
                new_primary = sentinel_group.replica.client()
                stored = {int(value) for value in new_primary.lrange("acked-writes", 0, -1)}
                lost = [n for n in writer.acknowledged if n not in stored]
                print(
                    f"failover: replica promoted {promoted - killed:.1f} s after the SIGKILL; API answered 200 again {first_200_after - killed:.1f} s after it"
                    f" (the poller saw 503 for {(max(outages) - min(outages)) if outages else 0:.1f} s, {len(outages)} of {len(poller.seen)} polls);"
                    f" job ({completed_at_kill} of {total} items done at the kill) completed {completed - killed:.1f} s after the kill;"
                    f" one-image jobs accepted (202) around it: {len(submitter.accepted)}, missing after it {len(missing)}, never completed {len(stuck)};"
                    f" acknowledged writes lost: {len(lost)} of {len(writer.acknowledged)}"
                )
                assert completed_at_kill < total
                # 503 and nothing else, only from the kill to the promotion (and the API's next check after it).
                assert statuses <= {200, 503}, statuses
                assert outages and min(outages) >= killed and max(outages) <= promoted + 2, (outages, killed, promoted)
                assert all(status == 200 for at, status in poller.seen if at > max(outages))
                check_every_item_once(client, new_primary, job_id, total, expected)
                assert lost == [], f"{len(lost)} acknowledged writes lost: {lost[:20]}"
                # Every job the API accepted around the failover exists on the new primary. One accepted in the
                # last instant before the kill may never complete: a measured loss (README, "What a failover can lose").
                assert submitter.statuses <= {202, 503} and submitter.accepted, submitter.statuses
                assert missing == []
                # The worker rode out the failover and takes new work on the new primary.
                assert stack.worker.alive()
                assert client.post("/v1/embeddings", json={"input": f"{slow_images}/cmp1.jpg"}).status_code == 200
        finally:
            writer.done.set()
            submitter.done.set()
            if poller is not None:
                poller.done.set()
