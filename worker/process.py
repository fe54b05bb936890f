"""Setting up a worker process, step by step: memory and CPUs first (before any thread starts), then
the configuration checks that stop a misconfigured worker fast, then the models, then Celery.

Each step that can refuse to start exits with ``worker cannot start: <why>``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from celery.signals import worker_ready, worker_shutting_down

from shared.celery_app import create_celery_app
from shared.cpus import available_cpus, format_cpu_list
from shared.model_catalog import CatalogError, allowed_models
from shared.queues import QUEUE_KINDS, queue_for
from shared.redis_client import sync_client
from shared.settings import Settings
from worker import metrics
from worker.cpu_budget import ThreadBudget

if TYPE_CHECKING:
    import torch
    from celery import Celery

    from worker.heartbeat import Heartbeat
    from worker.pipeline import ModelPipeline
    from worker.pools import WorkerPools
    from worker.result_store import ResultStore
    from worker.speed import SpeedMeter
    from worker.tasks import WorkerResources

log = logging.getLogger("worker")

M_ARENA_MAX = -8  # glibc's mallopt parameter number


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas unless the operator set MALLOC_ARENA_MAX.

    glibc gives busy threads arenas of their own (up to 8 per core). With task, decode and torch
    threads all freeing large tensors, memory fragments across arenas and RSS creeps up; with two
    arenas it stays flat after warm-up, at no cost in speed (README, "Throughput"). Must run before
    the worker starts its threads.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: its own allocator, nothing to tune
        return
    libc.mallopt(M_ARENA_MAX, arenas)


def pin_cpus(settings: Settings) -> None:
    if settings.worker_cpus is not None:
        # Before any thread starts (threads inherit it) and before torch loads libgomp, which sizes
        # its default thread team from the affinity it sees.
        os.sched_setaffinity(0, settings.worker_cpus)


def check_models_allowed(settings: Settings) -> None:
    try:
        allowed = allowed_models(settings.supported_models_file, settings.default_model)
    except CatalogError as exc:
        sys.exit(f"worker cannot start: {exc}")
    refused = [model for model in settings.worker_models if model not in allowed]
    if refused:
        sys.exit(f"worker cannot start: {', '.join(map(repr, refused))} not in the allow-list {settings.supported_models_file}")


def serve_metrics(settings: Settings) -> int | None:
    """The port worker metrics are served on, if any.

    Bound before the models load and before Celery starts, so a port problem stops the worker at once
    with a message, and nothing about metrics can keep a running worker unannounced.
    """
    if not settings.worker_metrics_port:
        return None
    try:
        port = metrics.serve(settings.worker_metrics_port, settings.worker_metrics_host)
    except metrics.MetricsUnavailable as exc:
        sys.exit(f"worker cannot start: {exc}")
    if port != settings.worker_metrics_port:
        log.warning(
            "IMBEDDINGS_WORKER_METRICS_PORT is in use; worker metrics served on the next free port",
            extra={"configured_port": settings.worker_metrics_port, "metrics_port": port},
        )
    log.info("worker metrics served", extra={"metrics_host": settings.worker_metrics_host, "metrics_port": port})
    return port


@dataclass
class Worker:
    """What ``load_worker`` built: the tasks' resources, and what set-up and shutdown need besides."""

    resources: WorkerResources
    pools: WorkerPools
    speeds: SpeedMeter
    budget: ThreadBudget
    cpus: list[int]

    def stop(self) -> None:
        for pipeline in self.resources.pipelines.values():
            pipeline.stop()
        self.pools.stop()


def load_worker(settings: Settings, node: str) -> Worker:
    """The pools, the loaded and checked models and the Redis clients every task of this process uses."""
    # Heavy imports after the configuration is known to be valid, so mistakes are reported fast.
    import transformers

    from worker.model.compute import configure_torch
    from worker.model.embedder import BackendUnavailable
    from worker.model.loader import ModelRefused, resolve_device, resolve_dtype
    from worker.result_store import ResultStore
    from worker.speed import SpeedMeter
    from worker.tasks import WorkerResources

    transformers.logging.set_verbosity_error()
    try:
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        cpus, budget = plan_threads(settings, device.type)
        configure_torch(budget.torch_threads, device, settings.cuda_memory_fraction)
        redis = sync_client(settings.redis_url, sentinel_master=settings.redis_sentinel_master)
        store = ResultStore(redis, settings.redis_key_prefix, reply_ttl_s=int(settings.request_timeout_s) + 5, job_ttl_s=settings.job_result_ttl_s)
        speeds = SpeedMeter()
        pools, pipelines = load_pipelines(settings, budget, device, dtype, store, speeds)
    except (ModelRefused, BackendUnavailable) as exc:
        sys.exit(f"worker cannot start: {exc}")
    return Worker(WorkerResources(pipelines, threading.Event(), store, redis, settings.redis_key_prefix, node), pools, speeds, budget, cpus)


def plan_threads(settings: Settings, device_type: str) -> tuple[list[int], ThreadBudget]:
    """The CPUs this process may use, and how its threads share them."""
    cpus = available_cpus()
    budget = ThreadBudget.for_cpus(len(cpus), device_type, settings, os.environ.get("OMP_NUM_THREADS"))
    log.info("worker thread budget", extra={"cpu_list": format_cpu_list(cpus), **budget.as_dict()})
    return cpus, budget


def load_pipelines(
    settings: Settings, budget: ThreadBudget, device: torch.device, dtype: torch.dtype, store: ResultStore, speeds: SpeedMeter
) -> tuple[WorkerPools, dict[str, ModelPipeline]]:
    """The shared pools, and each configured model loaded, checked and warmed up, with its pipeline."""
    from worker.images.limits import InputLimits
    from worker.pipeline import ModelPipeline
    from worker.pools import WorkerPools

    limits = InputLimits.from_settings(settings)
    pools = WorkerPools(settings, budget, limits)
    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    pipelines: dict[str, ModelPipeline] = {}
    for model_id in settings.worker_models:
        pipeline = ModelPipeline.load(model_id, settings, pools, limits, budget.torch_threads, device, dtype, token, store.mark_withdrawn, speeds)
        pipelines[pipeline.model.model_id] = pipeline
    return pools, pipelines


def heartbeat_for(settings: Settings, worker: Worker) -> Heartbeat:
    """The heartbeat that announces this worker's models (started once Celery is ready)."""
    from worker.heartbeat import Heartbeat

    # Heartbeats fail fast: a missed beat is retried by the next one, and a stopping worker must not
    # wait a minute on an unreachable Redis to withdraw.
    heartbeat_redis = sync_client(settings.redis_url, retries=1, sentinel_master=settings.redis_sentinel_master)
    resources = worker.resources
    models = [pipeline.model.info for pipeline in resources.pipelines.values()]
    return Heartbeat(heartbeat_redis, resources.key_prefix, resources.node, models, settings.heartbeat_interval_s, settings.heartbeat_ttl_s, worker.speeds)


def connect_signals(settings: Settings, worker: Worker, heartbeat: Heartbeat, metrics_port: int | None) -> None:
    """Announce the worker once Celery is ready; withdraw it as soon as shutdown begins."""
    from worker.images.decode_pool import STOP_GRACE_S

    @worker_ready.connect(weak=False)
    def _announce(**_: object) -> None:
        heartbeat.start()
        extra = {"node": worker.resources.node, "models": settings.worker_models, "metrics_port": metrics_port, "cpu_list": format_cpu_list(worker.cpus)}
        log.info("worker ready", extra={**extra, **worker.budget.as_dict()})

    @worker_shutting_down.connect(weak=False)
    def _withdraw(**_: object) -> None:
        # Warm shutdown: running requests finish; job chunks still waiting for a turn go back to the
        # queue at once (not after the visibility timeout), and this worker stops being announced.
        worker.resources.stopping.set()
        heartbeat.stop()
        # Decodes still running after a short grace are abandoned rather than waited for (up to
        # IMBEDDINGS_DECODE_CPU_SECONDS each): by then the API has re-sent or withdrawn a request
        # whose worker stopped heartbeating, and a job chunk goes back to the queue (WorkerStopping).
        worker.pools.decode.stop_after(STOP_GRACE_S)


def install(worker: Worker) -> None:
    """Hand the tasks their resources, before Celery consumes any."""
    from worker.tasks import WorkerTask

    WorkerTask.install(worker.resources)


def consume(app: Celery, settings: Settings, node: str) -> None:
    """Run Celery's worker on this process's model queues until it shuts down."""
    queues = [queue_for(model, kind) for model in settings.worker_models for kind in QUEUE_KINDS]
    # Gossip would make every worker consume every other worker's events (with task events on, a
    # fleet's whole event stream per worker); mingle only delays start-up. Flower needs neither.
    events = ["--task-events"] if settings.celery_events else ["--without-heartbeat"]
    app.worker_main(
        [
            "worker",
            "--pool=threads",
            f"--concurrency={settings.worker_concurrency}",
            f"--queues={','.join(queues)}",
            f"--hostname={node}",
            f"--loglevel={settings.log_level}",
            "--without-gossip",
            "--without-mingle",
            *events,
        ]
    )


def node_name() -> str:
    return f"worker-{os.getpid()}@{socket.gethostname()}"


def create_app(settings: Settings) -> Celery:
    from worker import tasks  # noqa: F401  (registers the Celery tasks with the app)

    app = create_celery_app(settings)
    app.conf.worker_consumer = "worker.consumer:EventBatchingConsumer"
    return app
