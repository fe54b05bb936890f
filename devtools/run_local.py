"""``python -m devtools.run_local`` (``make run``): the whole service on one machine.

Starts a private Redis server (append-only file on, data in ``.local/redis``) unless
``IMBEDDINGS_REDIS_URL`` is set, then one worker and the API. Ctrl-C stops them in order: API first
(no new work), then the worker (finishes its batch, returns the rest to the queue), then Redis.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

from devtools.processes import ServiceProcess
from devtools.redis_server import RedisServer, free_port
from shared.settings import REPO_ROOT, get_settings


def main() -> None:
    settings = get_settings()
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
    worker = ServiceProcess("worker", env).start()
    api = ServiceProcess("api", env).start()
    print(f"[run_local] API on http://{settings.host}:{settings.port}  (worker loading {', '.join(settings.worker_models)}; Ctrl-C stops all)", file=sys.stderr)
    exit_code = 0
    try:
        while not stopping:
            for process in (worker, api):
                if not process.alive():
                    code = process.stop()
                    print(f"[run_local] {process.module} exited with code {code}; stopping the rest", file=sys.stderr)
                    exit_code = code or 1
                    stopping = True
            time.sleep(0.2)
    finally:
        for process, timeout_s in ((api, 35), (worker, 60)):
            if process.alive():
                print(f"[run_local] stopping {process.module} ...", file=sys.stderr)
            process.stop(timeout_s=timeout_s)
        if redis_server is not None:
            print("[run_local] stopping Redis ...", file=sys.stderr)
            redis_server.stop()
    sys.exit(exit_code)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


if __name__ == "__main__":
    main()
