"""Workers on two hosts share a job over a real network, and one host's worker dies mid-job.

Three hosts (Linux network namespaces on one bridge, see tests/support/netns.py): Redis, the API and a photo
server on the first, one worker on each of the others. The workers reach Redis and the photos at the
first host's address, across the bridge, exactly as workers on separate machines would.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from devtools.processes import ServiceProcess, wait_until
from devtools.redis_server import RedisServer
from tests.support.images import serve_photos
from tests.support.jobs import CHUNK, SMALL_CHUNKS, check_every_item_once, elapsed, job_under_way, wait_done
from tests.support.netns import Host, NamespacesUnavailable, Network
from tests.support.stack import one_model_env, start_api, start_worker, wait_served

METRICS_PORT = 9101  # the default: each host has its own ports


@pytest.fixture
def network() -> Iterator[Network]:
    try:
        net = Network(["redis", "a", "b"])
    except (NamespacesUnavailable, FileNotFoundError) as exc:
        pytest.skip(f"Linux network namespaces cannot be created here (needs root or CAP_NET_ADMIN and iproute2): {exc}")
    try:
        yield net
    finally:
        net.close()


def chunks_done(host: Host) -> int:
    """Job chunks this host's worker has embedded, from its own /metrics across the network."""
    text = httpx.get(f"http://{host.address}:{METRICS_PORT}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "imbeddings_worker_tasks_total" and sample.labels == {"kind": "job_chunk", "outcome": "done"}:
                return int(sample.value)
    return 0


def test_two_hosts_share_a_job_and_survive_losing_one(tmp_path: Path, network: Network, allow_list: Path, tiny_models: dict[str, Path]) -> None:
    home, host_a, host_b = network.hosts["redis"], network.hosts["a"], network.hosts["b"]
    server = RedisServer(tmp_path / "redis", host=home.address, launcher=home.launcher)
    home.run(server.start)
    photos = serve_photos(delay_s=0.2, host=home.address)
    images = home.run(photos.__enter__)
    env = one_model_env(
        server.url,
        allow_list,
        tiny_models,
        **SMALL_CHUNKS,
        IMBEDDINGS_URL_ALLOWED_NETWORKS=f"{home.address}/32",
        IMBEDDINGS_WORKER_METRICS_PORT=str(METRICS_PORT),
    )
    model = env["IMBEDDINGS_DEFAULT_MODEL"]
    workers: dict[str, ServiceProcess] = {}
    api: ServiceProcess | None = None
    try:
        for name, host in (("a", host_a), ("b", host_b)):
            workers[name] = start_worker({**env, "IMBEDDINGS_WORKER_METRICS_HOST": host.address}, tmp_path / f"worker-{name}.log", launcher=host.launcher)
        api, base_url = home.run(start_api, env, tmp_path / "api.log", launcher=home.launcher)
        home.run(wait_served, base_url, model, workers["a"], count=2)

        def scenario() -> None:
            with httpx.Client(base_url=base_url, timeout=30) as client:
                total = 60
                job_id, expected = job_under_way(client, images, total)
                wait_until(lambda: chunks_done(host_a) > 0 and chunks_done(host_b) > 0, 60, what="both hosts to embed part of the job")
                by_a = chunks_done(host_a) * CHUNK
                workers["a"].stop(signal.SIGKILL, timeout_s=10)
                killed = time.monotonic()
                at_kill = client.get(f"/v1/jobs/{job_id}").json()
                assert at_kill["status"] == "running" and at_kill["completed"] < total, at_kill

                wait_done(client, job_id, timeout_s=120)
                by_b = chunks_done(host_b) * CHUNK
                print(f"split: host a embedded {by_a} items before its worker was SIGKILLed ({at_kill['completed']} of {total} done then),"
                      f" host b {by_b} in all; job completed {elapsed(killed)} s after the kill")
                check_every_item_once(client, redis.Redis(host=home.address, port=server.port, socket_timeout=5), job_id, total, expected)
                # Both hosts did part of the job (the chunks the dead worker held were done again by b).
                assert by_a > 0 and by_b > 0

        home.run(scenario)
    finally:
        if api is not None:
            api.stop()
        for worker in workers.values():
            worker.stop(signal.SIGKILL)
        photos.__exit__(None, None, None)
        server.stop(graceful=False)  # SIGKILL: a graceful SHUTDOWN would connect from outside the hosts
