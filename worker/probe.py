"""``python -m worker.probe ready|alive``: a worker's readiness and liveness, for Kubernetes exec probes.

A worker is *ready* when it has announced every model it serves in Redis: it does so only after it
has loaded and checked them and Celery consumes their queues, and its heartbeat keeps the
announcement fresh (``IMBEDDINGS_HEARTBEAT_TTL_S``). The probe runs beside the worker in its
container, so it finds the worker by host name, which is the pod's name; it imports neither torch
nor Celery, so it starts in well under a second.

*Alive* fails only when Redis answers and the worker's announcement has lapsed (a frozen worker).
While Redis itself is unreachable it passes: workers ride out a Redis restart, and a liveness probe
that failed then would restart the whole fleet at once.

Exit status 0 means yes; 1 means no, with the reason on stderr.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time

from redis.exceptions import RedisError

from shared.redis_client import sync_client
from shared.settings import get_settings
from shared.store.registry import WorkerRegistry


def missing_models(registry: WorkerRegistry, models: list[str], host: str, now: float) -> list[str]:
    """The models for which no worker on ``host`` holds an unexpired announcement."""
    missing = []
    for model in models:
        # Worker names are "worker-<pid>@<host>" (worker/__main__.py).
        if not any(name.endswith(f"@{host}") for name in registry.live_workers(model, now)):
            missing.append(model)
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.probe", description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=["ready", "alive"])
    args = parser.parse_args(argv)
    settings = get_settings()
    redis = sync_client(settings.redis_url, retries=0, sentinel_master=settings.redis_sentinel_master)
    host = socket.gethostname()
    try:
        missing = missing_models(WorkerRegistry(redis, settings.redis_key_prefix), settings.worker_models, host, time.time())
    except RedisError as exc:
        if args.check == "alive":
            return 0
        print(f"not ready: Redis unreachable ({exc})", file=sys.stderr)
        return 1
    if missing:
        print(f"not {args.check}: no worker on {host} announces {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
