"""Worker metrics in Prometheus format, served on the worker's own port for scraping.

Each worker process exposes its own registry (``IMBEDDINGS_WORKER_METRICS_PORT``), the usual
Prometheus pattern for a fleet of processes: no shared state to aggregate, and a dead worker's
numbers disappear with it.
"""

from __future__ import annotations

import errno
import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()

BATCH_SIZE = Histogram("imbeddings_worker_batch_size", "Images per forward pass.", ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=REGISTRY)
FORWARD_SECONDS = Histogram(
    "imbeddings_worker_forward_seconds",
    "Forward pass and pooling time per batch.",
    ["model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
PREPROCESS_SECONDS = Histogram(
    "imbeddings_worker_preprocess_seconds",
    "Decode and preprocessing time per image.",
    ["model"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
    registry=REGISTRY,
)
IMAGES = Counter("imbeddings_worker_images_total", "Images processed, by outcome.", ["model", "outcome"], registry=REGISTRY)
TASKS = Counter(
    "imbeddings_worker_tasks_total",
    "Celery tasks handled, by kind and outcome; each synchronous request of an embed task counts once.",
    ["kind", "outcome"],
    registry=REGISTRY,
)
REQUESTS_PER_TASK = Histogram(
    "imbeddings_worker_requests_per_task",
    "Synchronous requests per embed task: an API process sends those it admitted together as one task.",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64),
    registry=REGISTRY,
)
MODEL_LOAD_SECONDS = Gauge("imbeddings_worker_model_load_seconds", "Time taken to load and check each model.", ["model"], registry=REGISTRY)
URL_CONNECTIONS = Counter(
    "imbeddings_worker_url_connections_total", "Connections URL fetches used: opened, or reused from the keep-alive pool.", ["kind"], registry=REGISTRY
)
IMAGES_PER_SECOND = Gauge("imbeddings_worker_images_per_second", "Images through the model per second over the last minute.", ["model"], registry=REGISTRY)


class _Throughput:
    """Images per second over a sliding window, read when Prometheus scrapes."""

    def __init__(self, window_s: float = 60.0) -> None:
        self._window_s = window_s
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def add(self, count: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._events.append((now, count))
            self._trim(now)

    def rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return sum(count for _, count in self._events) / self._window_s

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self._window_s:
            self._events.popleft()


_throughput: dict[str, _Throughput] = {}


def observe_batch(model: str, size: int, seconds: float) -> None:
    BATCH_SIZE.labels(model).observe(size)
    FORWARD_SECONDS.labels(model).observe(seconds)
    if model not in _throughput:
        _throughput[model] = meter = _Throughput()
        IMAGES_PER_SECOND.labels(model).set_function(meter.rate)
    _throughput[model].add(size)


# Workers started on one host with the same settings each need a port of their own: the first
# takes the configured one, the next ones the free ports just above it.
FALLBACK_PORTS = 31


class MetricsUnavailable(RuntimeError):
    """No port could be bound; the message says which setting to change."""


def serve(port: int, host: str) -> int:
    """Serve on ``port``, or on the first free port of the next FALLBACK_PORTS; returns the port used."""
    last = min(port + FALLBACK_PORTS, 65535)
    for candidate in range(port, last + 1):
        try:
            start_http_server(candidate, addr=host, registry=REGISTRY)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                continue
            raise MetricsUnavailable(
                f"cannot serve worker metrics on {host}:{candidate} ({exc}); check IMBEDDINGS_WORKER_METRICS_HOST and "
                "IMBEDDINGS_WORKER_METRICS_PORT, or set IMBEDDINGS_WORKER_METRICS_PORT=0 to turn worker metrics off"
            ) from None
        return candidate
    raise MetricsUnavailable(
        f"IMBEDDINGS_WORKER_METRICS_PORT={port} and the ports up to {last} on {host} are all in use; give each worker on this "
        "host its own IMBEDDINGS_WORKER_METRICS_PORT, or set IMBEDDINGS_WORKER_METRICS_PORT=0 to turn worker metrics off"
    )
