"""Celery's own tools see the fleet, with the default settings: Flower (installed from PyPI, started
with the options compose and the manifests give it) shows the worker online and the tasks it ran, ``celery
inspect active_queues`` lists the worker's model queues, and task events go out in batches (Redis
PUBLISHes, nothing stored, fewer than one per task) and carry no image URL."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from devtools.photos import EXAMPLES
from devtools.processes import cpu_seconds, wait_until
from devtools.redis_server import RedisServer, free_port
from shared.queues import EMBED_TASK, JOB_CHUNK_TASK, queue_for
from shared.settings import REPO_ROOT
from shared.store.registry import WorkerRegistry
from tests.support.images import ImageServer, data_uri
from tests.support.jobs import submit, wait_done
from tests.support.processes import ready_line
from tests.support.stack import Stack, private_stack, running_redis, wait_worker_ready
from worker.consumer import EVENT_FLUSH_INTERVAL_S
from worker.probe import missing_models

FLOWER_AUTH = ("ops", "flower-test-password")
# Flower asks the workers over the broker; a busy 2-core test machine may take a while to answer.
INSPECT_TIMEOUT_MS = 10_000
TASK_EVENTS = ("task-received", "task-started", "task-succeeded")


@contextmanager
def _celery_stack(root: Path, redis_url: str, allow_list: Path, tiny_models: dict[str, Path], **overrides: str) -> Iterator[Stack]:
    """One worker serving vit-tiny, with Celery's events and heartbeats as the settings leave them."""
    with private_stack(root, redis_url, allow_list, tiny_models, **overrides) as stack:
        wait_worker_ready(stack.worker, timeout_s=60)
        yield stack


def _node(stack: Stack) -> str:
    """The worker's Celery hostname, from its "worker ready" log line."""
    line = ready_line(stack.worker)
    if line is None:
        raise AssertionError("the worker has not logged its ready line")
    return line["node"]


@pytest.fixture
def stack(tmp_path: Path, own_redis: RedisServer, allow_list: Path, tiny_models: dict[str, Path]) -> Iterator[Stack]:
    with _celery_stack(tmp_path, own_redis.url, allow_list, tiny_models) as stack:
        yield stack


class EventTap:
    """Every Celery event published on the broker, counted by type (events are Redis PUBLISHes)."""

    def __init__(self, redis_url: str) -> None:
        self._pubsub = redis.Redis.from_url(redis_url, socket_timeout=10).pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe("*celeryev*")
        self.counts: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()  # "publishes": messages, "messages": their bytes
        self.bodies: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=0.2)
            if message is None:
                continue
            envelope = json.loads(message["data"])
            body = envelope["body"]
            if envelope["properties"].get("body_encoding") == "base64":
                body = base64.b64decode(body).decode()
            self.bodies.append(body)
            # A worker sends its task events in batches ("task-multi"): a list of events in one message.
            events = json.loads(body)
            for event in events if isinstance(events, list) else [events]:
                self.counts[event["type"]] += 1
            self.bytes["messages"] += len(message["data"])
            self.bytes["publishes"] += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._pubsub.close()


def _flower(redis_url: str, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """Flower as docker-compose.yaml starts it (its options), behind basic auth as deploy/k8s runs it."""
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yaml").read_text())["services"]["flower"]["command"]
    options = [arg for arg in compose[3:] if not arg.startswith("--port=")]
    assert compose[:3] == ["celery", "--broker=redis://redis:6379/0", "flower"] and f"--inspect_timeout={INSPECT_TIMEOUT_MS}" in options
    command = [sys.executable, "-m", "celery", f"--broker={redis_url}", "flower", "--address=127.0.0.1", f"--port={port}", *options]
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            command, env={**os.environ, "FLOWER_BASIC_AUTH": ":".join(FLOWER_AUTH)},
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )


def _celery_json(env: dict[str, str], *args: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "shared.celery_tools", *args, "--timeout", str(INSPECT_TIMEOUT_MS // 1000), "--json"],
        cwd=REPO_ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_flower_sees_the_worker_online_and_its_tasks(tmp_path: Path, own_redis: RedisServer, stack: Stack, image_server: ImageServer) -> None:
    port = free_port()
    flower = _flower(own_redis.url, port, tmp_path / "flower.log")
    flower_url = f"http://127.0.0.1:{port}"
    node = _node(stack)
    try:
        def flower_up() -> bool:
            assert flower.poll() is None, (tmp_path / "flower.log").read_text()
            try:
                return httpx.get(f"{flower_url}/healthcheck", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(flower_up, 60, interval_s=0.25, what="Flower to listen")
        url = image_server.url("cmp1.jpg")
        with httpx.Client(base_url=stack.base_url, timeout=60) as client:
            assert client.post("/v1/embeddings", json={"input": [url, url]}).status_code == 200
            job = submit(client, {"input": [image_server.url("cmp2.jpg")] * 5})
            assert wait_done(client, job["id"])["completed"] == 5

        with httpx.Client(base_url=flower_url, auth=FLOWER_AUTH, timeout=INSPECT_TIMEOUT_MS / 1000 + 10) as flower_api:
            # Online: Flower's event state has the worker's heartbeats.
            wait_until(lambda: flower_api.get("/api/workers", params={"status": "true"}).json().get(node) is True, 30, what="Flower to see the worker online")
            # Its queues, as Flower asks the worker for them (remote control over the broker).
            workers = flower_api.get("/api/workers", params={"refresh": "true"}).json()
            assert {queue["name"] for queue in workers[node]["active_queues"]} == {
                queue_for(stack.default_model, "interactive"),
                queue_for(stack.default_model, "bulk"),
            }

            def tasks_seen() -> dict[str, dict]:
                tasks = flower_api.get("/api/tasks").json()
                return {info["name"]: info for info in tasks.values() if info.get("state") == "SUCCESS"}

            wait_until(lambda: {EMBED_TASK, JOB_CHUNK_TASK} <= set(tasks_seen()), 30, what="Flower to see both tasks succeed")
            seen = tasks_seen()
            for name in (EMBED_TASK, JOB_CHUNK_TASK):
                assert seen[name]["worker"] == node and seen[name]["received"] and seen[name]["succeeded"], seen[name]
            # Task events summarise the payload: the images' addresses never reach Flower.
            assert "'images': 2" in seen[EMBED_TASK]["kwargs"] and "'images': 5" in seen[JOB_CHUNK_TASK]["kwargs"]
            assert image_server.base_url not in json.dumps(flower_api.get("/api/tasks").json())
    finally:
        flower.terminate()
        try:
            flower.wait(timeout=15)
        except subprocess.TimeoutExpired:
            flower.kill()
            flower.wait()


def test_celery_inspect_lists_the_workers_model_queues(stack: Stack) -> None:
    node = _node(stack)
    replies = _celery_json(stack.env, "inspect", "active_queues")
    assert {queue["name"] for queue in replies[node]} == {queue_for(stack.default_model, "interactive"), queue_for(stack.default_model, "bulk")}
    # Addressed to the one worker, inspect returns as soon as it answers.
    stats = _celery_json(stack.env, "inspect", "stats", "--destination", node)
    assert stats[node]["pool"]["implementation"] == "celery.concurrency.thread:TaskPool"
    assert stats[node]["pool"]["max-concurrency"] == 16


def _probe(env: dict[str, str], check: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "worker.probe", check], cwd=REPO_ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


def test_worker_probe_follows_the_workers_announcement(own_redis: RedisServer, stack: Stack) -> None:
    """The Kubernetes exec probe (worker.probe), beside a real worker on the same host."""
    ready, alive = _probe(stack.env, "ready"), _probe(stack.env, "alive")
    assert (ready.returncode, alive.returncode) == (0, 0), ready.stderr + alive.stderr
    # The probe looks for a worker on its own host (pod): another pod's worker does not make it ready.
    store = redis.Redis.from_url(own_redis.url)
    assert missing_models(WorkerRegistry(store, "imb:"), [stack.default_model], socket.gethostname(), time.time()) == []
    assert missing_models(WorkerRegistry(store, "imb:"), [stack.default_model], "another-pod", time.time()) == [stack.default_model]
    stack.worker.stop()  # warm shutdown withdraws the announcement at once
    for check in ("ready", "alive"):
        gone = _probe(stack.env, check)
        assert gone.returncode == 1 and stack.default_model in gone.stderr, gone.stderr
    # Redis away: not ready, but still alive (a Redis outage must not restart the whole fleet).
    own_redis.stop(graceful=True)
    assert _probe(stack.env, "ready").returncode == 1
    assert _probe(stack.env, "alive").returncode == 0


def _event_cost(root: Path, allow_list: Path, tiny_models: dict[str, Path], image: str, requests: int, **overrides: str) -> tuple[float, float, EventTap]:
    """Worker and API CPU seconds per one-image request, and the events seen, over ``requests`` requests."""
    with running_redis(root / "redis") as server, _celery_stack(root, server.url, allow_list, tiny_models, **overrides) as stack:
        with stack.client() as client:
            for _ in range(5):  # warm: the first requests pay one-off costs
                assert client.post("/v1/embeddings", json={"input": image}).status_code == 200
            time.sleep(5 * EVENT_FLUSH_INTERVAL_S)  # the warm-up's events, published in batches, are out before the tap listens
            tap = EventTap(server.url)
            worker_before, api_before = cpu_seconds(stack.worker.pid), cpu_seconds(stack.api.pid)
            for _ in range(requests):
                assert client.post("/v1/embeddings", json={"input": image}).status_code == 200
            worker_s, api_s = cpu_seconds(stack.worker.pid) - worker_before, cpu_seconds(stack.api.pid) - api_before
            if overrides.get("IMBEDDINGS_CELERY_EVENTS") != "false":
                wait_until(lambda: tap.counts["task-succeeded"] >= requests, 30, what="the last batch of task events")
            tap.close()
        return worker_s / requests, api_s / requests, tap


def test_task_events_cost_a_few_publishes_per_task_and_switch_off(tmp_path: Path, allow_list: Path, tiny_models: dict[str, Path]) -> None:
    image = data_uri((EXAMPLES / "cmp1.jpg").read_bytes())
    requests = 200
    on_worker, on_api, on = _event_cost(tmp_path / "on", allow_list, tiny_models, image, requests)
    off_worker, off_api, off = _event_cost(tmp_path / "off", allow_list, tiny_models, image, requests, IMBEDDINGS_CELERY_EVENTS="false")
    task_events = {kind: on.counts[kind] for kind in TASK_EVENTS}
    print(
        f"\nevents on: {dict(on.counts)} over {requests} one-image requests, in {on.bytes['publishes']} PUBLISHes of {on.bytes['messages']} bytes; "
        f"CPU per request: worker {on_worker * 1000:.2f} ms with events, {off_worker * 1000:.2f} ms without; "
        f"API {on_api * 1000:.2f} ms with, {off_api * 1000:.2f} ms without"
    )
    # One event per step of each task in the worker (received, started, succeeded); the API sends none.
    assert task_events == dict.fromkeys(TASK_EVENTS, requests) and on.counts["task-sent"] == 0
    assert on.counts["worker-heartbeat"] >= 1
    # Batched: a task's "received" and "started" leave within microseconds of each other, so never in
    # more PUBLISHes than tasks (Celery's own flushing sent one per event).
    assert on.bytes["publishes"] <= requests + on.counts["worker-heartbeat"]
    assert not any("data:image" in body or "base64" in body for body in on.bodies)
    # Switched off: no events at all, not even heartbeats.
    assert sum(off.counts.values()) == 0, off.counts
    # A generous bound: events are a few small messages per task, not a share of the model's work.
    assert on_worker < off_worker * 1.5 + 0.005


def test_heartbeats_and_remote_control_come_back_after_a_redis_restart(own_redis: RedisServer, stack: Stack) -> None:
    """With heartbeats and events on, the worker's connection (shared/broker.py) rides out a restart."""
    node = _node(stack)
    own_redis.stop(graceful=True)
    time.sleep(2)
    own_redis.start()  # same port and data directory
    tap = EventTap(own_redis.url)
    try:
        wait_until(lambda: tap.counts["worker-heartbeat"] >= 2, 60, what="the worker's heartbeats after the restart")
    finally:
        tap.close()
    assert stack.worker.alive()
    replies = _celery_json(stack.env, "inspect", "active_queues", "--destination", node)
    assert {queue["name"] for queue in replies[node]} == {queue_for(stack.default_model, "interactive"), queue_for(stack.default_model, "bulk")}
