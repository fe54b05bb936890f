"""The API's Prometheus metrics (``GET /metrics``); workers serve theirs on their own port.

Request counts and latencies are recorded per process. Queue depths and job counts describe the
whole service and are read from Redis when Prometheus scrapes.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from api.state import AppState
from shared.queues import QUEUE_KINDS, count_queued

REGISTRY = CollectorRegistry()

REQUESTS = Counter(
    "imbeddings_http_requests_total",
    "HTTP requests, by route, method, model, status and API key id ('' before or without a key).",
    ["route", "method", "model", "status", "key"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    "imbeddings_http_request_duration_seconds",
    "Time to answer an HTTP request, by route.",
    ["route", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
CONNECTIONS_REFUSED = Counter(
    "imbeddings_http_connections_refused_total",
    "Connections closed before their request's head was read, by reason (header_timeout, header_too_large).",
    ["reason"],
    registry=REGISTRY,
)
BUFFERED_BODY_BYTES = Gauge("imbeddings_http_buffered_body_bytes", "Request body bytes the API holds now, across all requests in flight.", registry=REGISTRY)
IMAGES_EMBEDDED = Counter("imbeddings_images_embedded_total", "Images answered with vectors by /v1/embeddings, by model.", ["model"], registry=REGISTRY)
JOB_IMAGES = Counter("imbeddings_job_images_submitted_total", "Images submitted in jobs, by model.", ["model"], registry=REGISTRY)
QUEUE_DEPTH = Gauge(
    "imbeddings_queue_depth", "Tasks waiting in a model's queue (interactive: requests; bulk: job chunks).", ["model", "queue"], registry=REGISTRY
)
JOBS = Gauge("imbeddings_jobs", "Jobs by status: queued and running now; completed and cancelled so far.", ["status"], registry=REGISTRY)
SERVED_BY = Gauge("imbeddings_model_workers", "Live workers serving each model.", ["model"], registry=REGISTRY)


async def render(state: AppState) -> tuple[bytes, str]:
    """Refresh the service-wide gauges from Redis, then the exposition text.

    Per-model series cover the models a live worker serves and those with work waiting in their
    queues (so an autoscaler can start the first worker), not the whole allow-list.
    """
    now = time.time()
    pipe = state.redis.pipeline(transaction=False)
    for model in state.allowed_models:
        count_queued(pipe, model)
        state.registry.count_live_workers(pipe, model, now)
    state.jobs.count_jobs(pipe)
    *per_model, raw_counts = await pipe.execute()
    counts = state.jobs.job_counts(raw_counts)
    QUEUE_DEPTH.clear()
    SERVED_BY.clear()
    stride = len(QUEUE_KINDS) + 1
    for position, model in enumerate(state.allowed_models):
        *depths, workers = per_model[stride * position : stride * (position + 1)]
        if not (workers or any(depths)):
            continue
        for kind, depth in zip(QUEUE_KINDS, depths):
            QUEUE_DEPTH.labels(model, kind).set(depth)
        SERVED_BY.labels(model).set(workers)
    for status in ("queued", "running", "completed", "cancelled"):
        JOBS.labels(status).set(counts.get(status, 0))
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
