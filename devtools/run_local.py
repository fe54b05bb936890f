"""``python -m devtools.run_local`` (``make run``): the whole service on one machine.

Starts a private Redis server (append-only file on, data in ``.local/redis``) unless
``IMBEDDINGS_REDIS_URL`` is set, then one worker (``--workers N``: N workers, each given its own
share of the CPUs through ``IMBEDDINGS_WORKER_CPUS``) and the API. Ctrl-C stops them in order: API
first (no new work), then the workers (each finishes its batch, returns the rest to the queue), then
Redis.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from devtools.processes import ServiceProcess
from devtools.redis_server import RedisServer, free_port
from shared.cpus import available_cpus, format_cpu_list
from shared.settings import REPO_ROOT, get_settings


def split_cpus(cpus: frozenset[int], workers: int) -> list[frozenset[int]]:
    """``cpus`` in ``workers`` contiguous shares whose sizes differ by at most one."""
    ordered = sorted(cpus)
    return [frozenset(ordered[i * len(ordered) // workers : (i + 1) * len(ordered) // workers]) for i in range(workers)]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m devtools.run_local", description="Redis, worker(s) and the API on this machine.")
    parser.add_argument("--workers", type=int, default=1, help="workers to start, splitting the CPUs evenly between them (default: 1, with all of them)")
    args = parser.parse_args()
    settings = get_settings()
    cpus = settings.worker_cpus or available_cpus()
    if not 1 <= args.workers <= len(cpus):
        parser.error(f"--workers must be between 1 and the {len(cpus)} CPUs there are to split (CPUs {format_cpu_list(cpus)})")
    env = dict(os.environ)
    redis_server: RedisServer | None = None
    if "IMBEDDINGS_REDIS_URL" not in os.environ:
        port = 6379 if _port_free(6379) else free_port()
        redis_server = RedisServer(REPO_ROOT / ".local" / "redis", port).start()
        env["IMBEDDINGS_REDIS_URL"] = redis_server.url
        print(f"[run_local] private Redis on {redis_server.url} (append-only file in {redis_server.data_dir})", file=sys.stderr)

    stopping = False

    def request_stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    # Children run in their own process groups: Ctrl-C reaches only this supervisor, which then
    # stops them in order.
    if args.workers == 1:
        workers = [ServiceProcess("worker", env).start()]
    else:
        # Each worker sizes its thread pools from its own share; they find free metrics ports themselves.
        shares = split_cpus(cpus, args.workers)
        workers = [ServiceProcess("worker", {**env, "IMBEDDINGS_WORKER_CPUS": format_cpu_list(share)}).start() for share in shares]
        print(f"[run_local] {args.workers} workers on CPUs {' | '.join(format_cpu_list(share) for share in shares)}", file=sys.stderr)
    api = ServiceProcess("api", env).start()
    print(f"[run_local] API on http://{settings.host}:{settings.port}  (loading {', '.join(settings.worker_models)}; Ctrl-C stops all)", file=sys.stderr)
    exit_code = 0
    try:
        while not stopping:
            for process in (*workers, api):
                if not process.alive():
                    code = process.stop()
                    print(f"[run_local] {process.module} exited with code {code}; stopping the rest", file=sys.stderr)
                    exit_code = code or 1
                    stopping = True
            time.sleep(0.2)
    finally:
        if api.alive():
            print("[run_local] stopping api ...", file=sys.stderr)
        api.stop(timeout_s=35)
        if any(worker.alive() for worker in workers):
            print("[run_local] stopping worker(s) ...", file=sys.stderr)
        # Together: each finishes its own batch, so none needs to wait for another.
        with ThreadPoolExecutor(len(workers)) as pool:
            list(pool.map(lambda worker: worker.stop(timeout_s=60), workers))
        if redis_server is not None:
            print("[run_local] stopping Redis ...", file=sys.stderr)
            redis_server.stop()
    sys.exit(exit_code)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


if __name__ == "__main__":
    main()
