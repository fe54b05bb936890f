"""Several workers on one host with default settings: each announced, each on its own metrics port,
each sizing its thread pools from the CPUs it may use."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from contextlib import ExitStack, closing
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devtools.photos import EXAMPLES
from devtools.processes import ServiceProcess, wait_until
from devtools.redis_server import RedisServer, free_port
from devtools.run_local import split_cpus
from shared.cpus import available_cpus, parse_cpu_list
from shared.protocol import ModelInfo
from shared.redis_client import sync_client
from shared.settings import REPO_ROOT, Settings
from shared.store.registry import RegistryKeys
from tests.support.images import data_uri
from tests.support.processes import ready_line
from tests.support.stack import private_stack, service_env, wait_served
from worker.heartbeat import Heartbeat
from worker.metrics import FALLBACK_PORTS

JPEG = (EXAMPLES / "cmp1.jpg").read_bytes()
DEFAULT_METRICS_PORT = Settings.model_fields["worker_metrics_port"].default


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _wait_ready_line(worker: ServiceProcess) -> dict:
    def ready() -> bool:
        if not worker.alive():
            raise RuntimeError(f"worker exited:\n{worker.log_text()[-3000:]}")
        return ready_line(worker) is not None

    wait_until(ready, 120, interval_s=0.25, what="the worker's ready line")
    entry = ready_line(worker)
    assert entry is not None
    return entry


def _images_embedded(port: int, model: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "imbeddings_worker_images_total" and sample.labels == {"model": model, "outcome": "embedded"}
    )


def test_two_workers_with_the_same_metrics_port_are_both_announced_and_both_serve(
    tmp_path: Path, own_redis: RedisServer, allow_list: Path, tiny_models: dict[str, Path]
) -> None:
    model = str(tiny_models["dinov2-tiny"])
    # The default port when this machine leaves it free; otherwise any port both workers are given.
    port = DEFAULT_METRICS_PORT if _port_free(DEFAULT_METRICS_PORT) else free_port()
    with private_stack(tmp_path, own_redis.url, allow_list, tiny_models, model="dinov2-tiny", workers=2, IMBEDDINGS_WORKER_METRICS_PORT=str(port)) as stack:
        ready = [_wait_ready_line(worker) for worker in stack.workers]
        wait_served(stack.base_url, model, stack.worker, count=2)
        assert httpx.get(f"{stack.base_url}/v1/models/{model}").json()["workers"] == 2

        ports = sorted(entry["metrics_port"] for entry in ready)
        assert ports[0] == port and port < ports[1] <= port + FALLBACK_PORTS, ports
        fallback = next(worker for worker, entry in zip(stack.workers, ready) if entry["metrics_port"] != port)
        assert "IMBEDDINGS_WORKER_METRICS_PORT is in use" in fallback.log_text()

        # Idle workers take turns at the queue, so a few requests in a row reach both.
        def both_served() -> bool:
            assert httpx.post(f"{stack.base_url}/v1/embeddings", json={"model": model, "input": data_uri(JPEG)}, timeout=30).status_code == 200
            return all(_images_embedded(p, model) > 0 for p in ports)

        wait_until(both_served, 60, interval_s=0, what="both workers to embed images")


def test_worker_cpus_sets_the_thread_budget(
    tmp_path: Path, own_redis: RedisServer, allow_list: Path, tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cpu = min(available_cpus())
    model = str(tiny_models["vit-tiny"])
    # Only the CPU list may decide the budget here, not a thread count from the environment.
    monkeypatch.delenv("IMBEDDINGS_TORCH_THREADS", raising=False)
    monkeypatch.delenv("IMBEDDINGS_PREPROCESS_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with private_stack(tmp_path, own_redis.url, allow_list, tiny_models, unset=("OMP_NUM_THREADS",), IMBEDDINGS_WORKER_CPUS=str(cpu)) as stack:
        ready = _wait_ready_line(stack.worker)
        assert (ready["cpu_list"], ready["cpus"], ready["torch_threads"], ready["preprocess_threads"]) == (str(cpu), 1, 1, 1)
        assert os.sched_getaffinity(stack.worker.pid) == {cpu}
        answer = httpx.post(f"{stack.base_url}/v1/embeddings", json={"model": model, "input": [data_uri(JPEG)] * 3}, timeout=30)
        assert answer.status_code == 200 and len(answer.json()["data"]) == 3


@pytest.mark.parametrize("value", ["0-x", "3-1", "0,,1", str(max(available_cpus()) + 1)])
def test_invalid_worker_cpus_stop_the_worker_naming_the_variable(value: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker"],
        cwd=REPO_ROOT,
        env={"IMBEDDINGS_WORKER_CPUS": value, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "IMBEDDINGS_WORKER_CPUS" in result.stderr, result.stderr


def test_heartbeat_starts_while_redis_is_away_and_announces_once_it_is_back(tmp_path: Path) -> None:
    port = free_port()
    keys = RegistryKeys("imb:")
    info = ModelInfo(
        id="m", model_type="vit", dim=8, patch_size=16, image_size=(32, 32), num_register_tokens=0, tokens_per_image=5, dtype="float32", device="cpu"
    )
    heartbeat = Heartbeat(sync_client(f"redis://127.0.0.1:{port}/0", retries=1), keys.prefix, "worker-1@host", [info], interval_s=0.2, ttl_s=2)
    heartbeat.start()  # Redis is not there yet: must not raise
    server = RedisServer(tmp_path / "redis", port).start()
    try:
        client = sync_client(server.url)
        wait_until(lambda: client.zscore(keys.workers("m"), "worker-1@host") is not None, 15, what="the first beat")
        heartbeat.stop()
        assert client.zscore(keys.workers("m"), "worker-1@host") is None
    finally:
        heartbeat.stop()
        server.stop(graceful=False)


def _busy_port_range(length: int) -> tuple[int, ExitStack]:
    """``length`` consecutive ports on 127.0.0.1, all listened on until the stack is closed."""
    for _ in range(50):
        first = free_port()
        stack = ExitStack()
        try:
            for port in range(first, first + length):
                sock = stack.enter_context(closing(socket.socket()))
                sock.bind(("127.0.0.1", port))
                sock.listen()
        except OSError:
            stack.close()
            continue
        return first, stack
    raise RuntimeError(f"found no {length} free consecutive ports")


def test_a_worker_with_no_free_metrics_port_stops_at_start_saying_what_to_do(tmp_path: Path, allow_list: Path, tiny_models: dict[str, Path]) -> None:
    first, busy = _busy_port_range(FALLBACK_PORTS + 1)
    with busy:
        env = service_env("redis://127.0.0.1:1/0", allow_list, tiny_models, IMBEDDINGS_WORKER_METRICS_PORT=str(first))
        result = subprocess.run([sys.executable, "-m", "worker"], cwd=REPO_ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert f"IMBEDDINGS_WORKER_METRICS_PORT={first}" in message and "IMBEDDINGS_WORKER_METRICS_PORT=0" in message and "its own" in message, message


@pytest.mark.skipif(len(available_cpus()) < 2, reason="needs two CPUs to split")
def test_run_local_splits_the_cpus_between_its_workers(tmp_path: Path, own_redis: RedisServer, allow_list: Path, tiny_models: dict[str, Path]) -> None:
    model = str(tiny_models["dinov2-tiny"])
    port = free_port()
    env = service_env(own_redis.url, allow_list, tiny_models, IMBEDDINGS_DEFAULT_MODEL=model, IMBEDDINGS_WORKER_MODELS=model, IMBEDDINGS_PORT=str(port))
    del env["IMBEDDINGS_WORKER_METRICS_PORT"]  # the default, for both workers
    log_path = tmp_path / "run_local.log"
    with open(log_path, "wb") as log:
        runner = subprocess.Popen(
            [sys.executable, "-m", "devtools.run_local", "--workers", "2"],
            cwd=REPO_ROOT,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        def both_ready() -> list[dict]:
            assert runner.poll() is None, log_path.read_text()
            lines = log_path.read_text(errors="replace").split("\n")[:-1]
            return [entry for line in lines if line.startswith("{") and (entry := json.loads(line)).get("message") == "worker ready"]

        wait_until(lambda: len(both_ready()) == 2, 120, interval_s=0.25, what="two workers ready")
        shares = sorted((parse_cpu_list(entry["cpu_list"]) for entry in both_ready()), key=min)
        assert shares == split_cpus(available_cpus(), 2)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models/{model}", timeout=5).json()["workers"] == 2
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"model": model, "input": data_uri(JPEG)}, timeout=30)
        assert answer.status_code == 200
    finally:
        runner.send_signal(signal.SIGINT)
        try:
            runner.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()
    assert runner.returncode == 0, log_path.read_text()[-3000:]
