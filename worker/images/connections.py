"""Keep-alive connections to image servers, kept per checked address so reuse never skips a check.

A pooled connection is filed under (scheme, host, port, address it is connected to). The fetcher
resolves and checks the host for every URL and then asks only for connections to addresses that
passed that fresh check, so a pooled socket can never carry a request to an address that is
forbidden now, and a DNS answer that changes simply stops matching the old connections.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field

import h11

# Servers close idle keep-alive connections after 5 s (Apache) to 75 s (nginx); one idle longer than
# this is more likely dead than useful, and closing it frees the server's slot too.
IDLE_TIMEOUT_S = 15.0
# Response headers larger than this are refused (h11 buffers them whole before parsing).
MAX_HEADER_BYTES = 64 * 1024


@dataclass(frozen=True)
class PoolKey:
    scheme: str
    host: str
    port: int
    address: str


@dataclass(eq=False)
class Connection:
    """One HTTP/1.1 connection to a checked address."""

    key: PoolKey
    sock: socket.socket
    http: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES))
    reused: bool = False
    idle_since: float = 0.0

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def still_open(self) -> bool:
        """An idle connection has nothing to read: readable means the server closed it or sent junk."""
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return False
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable


class ConnectionPool:
    """Idle connections of one worker, at most ``max_idle`` of them (0 turns reuse off)."""

    def __init__(self, max_idle: int) -> None:
        self._max_idle = max_idle
        self._idle: dict[PoolKey, list[Connection]] = {}
        self._count = 0
        self._lock = threading.Lock()

    def take(self, scheme: str, host: str, port: int, addresses: list[str]) -> Connection | None:
        """An idle connection to one of ``addresses`` (the ones just checked), or None."""
        stale: list[Connection] = []
        found = None
        with self._lock:
            stale += self._expire(time.monotonic())
            for address in addresses:
                idle = self._idle.get(PoolKey(scheme, host, port, address))
                while idle and found is None:
                    connection = idle.pop()
                    self._count -= 1
                    if connection.still_open():
                        found = connection
                    else:
                        stale.append(connection)
                if found is not None:
                    break
        for connection in stale:
            connection.close()
        if found is not None:
            found.reused = True
        return found

    def give_back(self, connection: Connection) -> None:
        """Keep a connection whose last exchange ended cleanly; close it when the pool is full."""
        with self._lock:
            if self._count < self._max_idle:
                connection.idle_since = time.monotonic()
                self._idle.setdefault(connection.key, []).append(connection)
                self._count += 1
                return
        connection.close()

    def idle_count(self) -> int:
        with self._lock:
            return self._count

    def close(self) -> None:
        with self._lock:
            idle = [connection for connections in self._idle.values() for connection in connections]
            self._idle.clear()
            self._count = 0
        for connection in idle:
            connection.close()

    def _expire(self, now: float) -> list[Connection]:
        expired = []
        for key in list(self._idle):
            kept = [c for c in self._idle[key] if now - c.idle_since < IDLE_TIMEOUT_S]
            expired += [c for c in self._idle[key] if now - c.idle_since >= IDLE_TIMEOUT_S]
            if kept:
                self._idle[key] = kept
            else:
                del self._idle[key]
        self._count -= len(expired)
        return expired
