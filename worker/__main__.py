"""``python -m worker``: load the configured models, then consume their queues with Celery."""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import sys

from celery.signals import worker_ready, worker_shutting_down

from shared.celery_app import create_celery_app
from shared.cpus import available_cpus, format_cpu_list
from shared.logs import configure_logging
from shared.model_catalog import CatalogError, allowed_models
from shared.queues import queue_for
from shared.redis_client import sync_client
from shared.settings import get_settings
from worker import metrics
from worker.cpu_budget import ThreadBudget

log = logging.getLogger("worker")


M_ARENA_MAX = -8  # glibc's mallopt parameter number


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas unless the operator set MALLOC_ARENA_MAX.

    glibc gives busy threads arenas of their own (up to 8 per core). With task, decode and torch
    threads all freeing large tensors, memory fragments across arenas and RSS creeps up: ViT-B/16
    in bfloat16 grew 170 MB over 2,000 requests with the default and stayed flat after warm-up
    with two arenas, at no cost in speed (bench/). Must run before the worker starts its threads.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: its own allocator, nothing to tune
        return
    libc.mallopt(M_ARENA_MAX, arenas)


def main() -> None:
    limit_malloc_arenas()
    settings = get_settings()
    if settings.worker_cpus is not None:
        # Before any thread starts (threads inherit it) and before torch loads libgomp, which sizes
        # its default thread team from the affinity it sees.
        os.sched_setaffinity(0, settings.worker_cpus)
    configure_logging("worker", settings.log_level, settings.log_json)

    try:
        allowed = allowed_models(settings.supported_models_file, settings.default_model)
    except CatalogError as exc:
        sys.exit(f"worker cannot start: {exc}")
    refused = [model for model in settings.worker_models if model not in allowed]
    if refused:
        sys.exit(f"worker cannot start: {', '.join(map(repr, refused))} not in the allow-list {settings.supported_models_file}")

    # Bound before the models load and before Celery starts, so a port problem stops the worker
    # at once with a message, and nothing about metrics can keep a running worker unannounced.
    metrics_port = None
    if settings.worker_metrics_port:
        try:
            metrics_port = metrics.serve(settings.worker_metrics_port, settings.worker_metrics_host)
        except metrics.MetricsUnavailable as exc:
            sys.exit(f"worker cannot start: {exc}")
        if metrics_port != settings.worker_metrics_port:
            log.warning(
                "IMBEDDINGS_WORKER_METRICS_PORT is in use; worker metrics served on the next free port",
                extra={"configured_port": settings.worker_metrics_port, "metrics_port": metrics_port},
            )
        log.info("worker metrics served", extra={"metrics_host": settings.worker_metrics_host, "metrics_port": metrics_port})

    # Heavy imports after the configuration is known to be valid, so mistakes are reported fast.
    import transformers

    from worker import tasks  # registers the Celery tasks
    from worker.heartbeat import Heartbeat
    from worker.images.decode_pool import STOP_GRACE_S
    from worker.model.embedder import BackendUnavailable
    from worker.model.loader import ModelRefused, resolve_device, resolve_dtype
    from worker.pipeline import WorkerRuntime, configure_torch
    from worker.result_store import ResultStore

    transformers.logging.set_verbosity_error()
    app = create_celery_app(settings)
    try:
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        cpus = available_cpus()
        budget = ThreadBudget.for_cpus(len(cpus), device.type, settings, os.environ.get("OMP_NUM_THREADS"))
        log.info("worker thread budget", extra={"cpu_list": format_cpu_list(cpus), **budget.as_dict()})
        configure_torch(settings, budget, device)
        redis = sync_client(settings.redis_url, sentinel_master=settings.redis_sentinel_master)
        store = ResultStore(redis, settings.redis_key_prefix, reply_ttl_s=int(settings.request_timeout_s) + 5, job_ttl_s=settings.job_result_ttl_s)
        runtime = WorkerRuntime(settings, budget, store.mark_withdrawn)
        token = settings.hf_token.get_secret_value() if settings.hf_token else None
        for model_id in settings.worker_models:
            runtime.load(model_id, device, dtype, token)
    except (ModelRefused, BackendUnavailable) as exc:
        sys.exit(f"worker cannot start: {exc}")

    # Heartbeats fail fast: a missed beat is retried by the next one, and a stopping worker must not
    # wait a minute on an unreachable Redis to withdraw.
    heartbeat_redis = sync_client(settings.redis_url, retries=1, sentinel_master=settings.redis_sentinel_master)
    node = f"worker-{os.getpid()}@{socket.gethostname()}"
    tasks.install_context(tasks.WorkerContext(runtime, store, redis, settings.redis_key_prefix, node))
    heartbeat = Heartbeat(heartbeat_redis, settings.redis_key_prefix, node, [m.model.info for m in runtime.models.values()], settings.heartbeat_interval_s, settings.heartbeat_ttl_s, runtime.speeds)

    @worker_ready.connect(weak=False)
    def _announce(**_: object) -> None:
        heartbeat.start()
        log.info("worker ready", extra={"node": node, "models": settings.worker_models, "metrics_port": metrics_port, "cpu_list": format_cpu_list(cpus), **budget.as_dict()})

    @worker_shutting_down.connect(weak=False)
    def _withdraw(**_: object) -> None:
        # Warm shutdown: running requests finish; job chunks still waiting for a turn go back to the
        # queue at once (not after the visibility timeout), and this worker stops being announced.
        runtime.stopping.set()
        heartbeat.stop()
        # Decodes still running after a short grace are abandoned rather than waited for (up to
        # IMBEDDINGS_DECODE_CPU_SECONDS each): by then the API has re-sent or withdrawn a request
        # whose worker stopped heartbeating, and a job chunk goes back to the queue (WorkerStopping).
        runtime.decode_pool.stop_after(STOP_GRACE_S)

    queues = [queue_for(model, kind) for model in settings.worker_models for kind in ("interactive", "bulk")]
    # Gossip would make every worker consume every other worker's events (with task events on, a
    # fleet's whole event stream per worker); mingle only delays start-up. Flower needs neither.
    events = ["--task-events"] if settings.celery_events else ["--without-heartbeat"]
    app.worker_main([
        "worker",
        "--pool=threads",
        f"--concurrency={settings.worker_concurrency}",
        f"--queues={','.join(queues)}",
        f"--hostname={node}",
        f"--loglevel={settings.log_level}",
        "--without-gossip",
        "--without-mingle",
        *events,
    ])
    runtime.stop()


if __name__ == "__main__":
    main()
