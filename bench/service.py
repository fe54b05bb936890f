"""The service end to end: Redis, one worker and the API as real processes, driven over HTTP."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench.load import build_request, percentile, run_load
from devtools.processes import ServiceProcess, cpu_seconds, rss_mb, tree_cpu_seconds, wait_until
from devtools.redis_server import RedisServer, free_port


@dataclass
class Stack:
    redis: RedisServer
    worker: ServiceProcess
    api: ServiceProcess
    port: int
    metrics_port: int

    def worker_totals(self) -> dict[str, float]:
        """Each sample of the worker's /metrics so far, summed over its labels."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        totals: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
        return totals

    def batch_totals(self) -> tuple[float, float, float]:
        """Batches, images and forward seconds so far, from the worker's /metrics."""
        totals = self.worker_totals()
        return (
            totals.get("imbeddings_worker_batch_size_count", 0.0),
            totals.get("imbeddings_worker_batch_size_sum", 0.0),
            totals.get("imbeddings_worker_forward_seconds_sum", 0.0),
        )

    def stop(self) -> None:
        self.api.stop()
        self.worker.stop(timeout_s=60)
        self.redis.stop(graceful=False)


def _batch_means(before: tuple[float, float, float], after: tuple[float, float, float]) -> tuple[float, float]:
    """Mean batch size and mean forward time (ms) between two readings."""
    batches = (after[0] - before[0]) or 1.0
    return (after[1] - before[1]) / batches, (after[2] - before[2]) / batches * 1000


def start_stack(workdir: Path, model_dir: Path, dtype: str, extra_env: dict[str, str]) -> Stack:
    redis = RedisServer(workdir / "redis").start()
    allow_list = workdir / "models.txt"
    allow_list.write_text(f"{model_dir}\n")
    port = free_port()
    metrics_port = free_port()
    env = {
        "IMBEDDINGS_REDIS_URL": redis.url,
        "IMBEDDINGS_SUPPORTED_MODELS_FILE": str(allow_list),
        "IMBEDDINGS_DEFAULT_MODEL": str(model_dir),
        "IMBEDDINGS_DTYPE": dtype,
        "IMBEDDINGS_DEVICE": "cpu",
        "IMBEDDINGS_PORT": str(port),
        "IMBEDDINGS_WORKER_METRICS_PORT": str(metrics_port),
        "HF_HUB_OFFLINE": "1",
        **extra_env,
    }
    worker = ServiceProcess("worker", env, workdir / "worker.log").start()
    api = ServiceProcess("api", env, workdir / "api.log").start()

    def ready() -> bool:
        if not worker.alive() or not api.alive():
            raise RuntimeError(f"service exited; see {workdir}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    wait_until(ready, 300, interval_s=0.5, what="the service to be ready")
    return Stack(redis, worker, api, port, metrics_port)


def one_image_bodies(jpegs: list[bytes], port: int) -> list[bytes]:
    bodies = []
    for data in jpegs:
        body = json.dumps({"input": "data:image/jpeg;base64," + base64.b64encode(data).decode(), "encoding_format": "base64"}).encode()
        bodies.append(build_request("127.0.0.1", port, "/v1/embeddings", body))
    return bodies


def measure_service(stack: Stack, jpegs: list[bytes], clients: int, requests: int, latency_requests: int) -> dict[str, object]:
    requests_raw = one_image_bodies(jpegs, stack.port)
    api_rss_start = rss_mb(stack.api.pid)

    # Low load: one client, one image at a time. The worker's own forward time during this phase is
    # what the latency is compared with: the machine's speed drifts between separate measurements.
    asyncio.run(run_load("127.0.0.1", stack.port, requests_raw, 1, 10))
    before_low = stack.batch_totals()
    low = asyncio.run(run_load("127.0.0.1", stack.port, requests_raw, 1, latency_requests))
    _, low_forward_ms = _batch_means(before_low, stack.batch_totals())

    # Throughput: many concurrent one-image clients. Warm up, then measure.
    asyncio.run(run_load("127.0.0.1", stack.port, requests_raw, clients, 4 * clients))
    worker_rss_start = rss_mb(stack.worker.pid)
    pids = {"worker": stack.worker.pid, "api": stack.api.pid, "redis": stack.redis.process.pid, "client": os.getpid()}
    cpu_start = {name: cpu_seconds(pid) for name, pid in pids.items()}
    worker_tree_start = tree_cpu_seconds(stack.worker.pid)
    rss_trace: list[float] = []

    def sample_rss(done: int) -> None:
        if done % max(1, requests // 10) == 0:
            rss_trace.append(round(rss_mb(stack.worker.pid), 1))

    before_high = stack.batch_totals()
    high = asyncio.run(run_load("127.0.0.1", stack.port, requests_raw, clients, requests, on_progress=sample_rss))
    worker_tree = tree_cpu_seconds(stack.worker.pid) - worker_tree_start
    cpu = {name: (cpu_seconds(pid) - cpu_start[name]) / requests * 1000 for name, pid in pids.items()}
    # The worker's decode processes are its children: their CPU is not in the worker's own.
    cpu["worker_decoders"] = worker_tree / requests * 1000 - cpu["worker"]
    mean_batch, mean_forward_ms = _batch_means(before_high, stack.batch_totals())
    errors = {**low.errors, **high.errors}
    if errors:
        raise RuntimeError(f"the service answered errors during the benchmark: {errors}")
    return {
        "e2e_img_s": requests / high.wall_s,
        "e2e_p50_ms": percentile(high.latencies_s, 50) * 1000,
        "low_load_p50_ms": percentile(low.latencies_s, 50) * 1000,
        "low_load_p99_ms": percentile(low.latencies_s, 99) * 1000,
        "low_load_worker_forward_ms": low_forward_ms,
        "api_rss_mb_start": api_rss_start,
        "api_rss_mb_end": rss_mb(stack.api.pid),
        "worker_rss_mb_start": worker_rss_start,
        "worker_rss_mb_end": rss_mb(stack.worker.pid),
        "worker_rss_mb_trace": rss_trace,
        **{f"{name}_cpu_ms_per_img": value for name, value in cpu.items()},
        "mean_batch_size": mean_batch,
        "mean_forward_ms": mean_forward_ms,
        "requests": requests,
    }
