"""Redis clients that ride out a short outage (a restart, a Sentinel failover) instead of failing the work in hand."""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.sentinel
from redis.backoff import ExponentialBackoff
from redis.connection import HiredisRespSerializer
from redis.exceptions import ConnectionError, TimeoutError
from redis.retry import Retry

from shared.sentinel import SENTINEL_QUERY_TIMEOUTS, SentinelUrl, is_sentinel_url


class _SentinelConnection(redis.sentinel.SentinelManagedConnection):
    """Reconnects through the Sentinels when a command is retried.

    redis-py (8.1) asks the Sentinels for the primary only in ``connect()``; a command retried after
    its connection dropped reconnects from ``send_packed_command`` to the address it had, so every
    retry of a write in flight during a failover went to the dead primary (a write stuck for a minute,
    then failed).
    """

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if not self._sock:
            self.connect()
        super().send_packed_command(command, check_health)


class _HiredisPacking:
    """Commands packed by hiredis, as redis-py's synchronous connections pack them.

    redis-py (8.1) packs an asyncio connection's commands in Python, argument by argument, even with
    hiredis installed: for the API's admission script (about 40 arguments) that was the largest part
    of its Redis cost per request. The bytes sent are the same. A command with a large value (image
    bytes) keeps redis-py's own packing, which sends the value as a chunk of its own instead of
    copying it into one buffer.
    """

    _buffer_cutoff: int
    _hiredis = HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        for arg in args:
            if isinstance(arg, (bytes, memoryview)) and len(arg) > self._buffer_cutoff:
                return super().pack_command(*args)  # type: ignore[misc, no-any-return]
        return self._hiredis.pack(*args)


_PACKING_CLASSES: dict[type, type] = {}


def _with_hiredis_packing(connection_class: type) -> type:
    """``connection_class`` (the one a URL's scheme chose: TCP, TLS or Unix socket) packing with hiredis."""
    if connection_class not in _PACKING_CLASSES:
        _PACKING_CLASSES[connection_class] = type(connection_class.__name__, (_HiredisPacking, connection_class), {})
    return _PACKING_CLASSES[connection_class]


class _LeanConnectionPool(redis.asyncio.ConnectionPool):
    """redis-py's asyncio pool without its bookkeeping around every command.

    redis-py (8.1) takes a lock, records OpenTelemetry connection counts and dispatches a
    connection-released event around each command it sends. The service uses neither redis-py's
    OpenTelemetry metrics nor the credential providers that listen to those events, and a pool used
    from one event loop needs no lock: taking and returning a connection never waits. Each connection
    is still checked as redis-py checks it before use (connected, nothing left unread), and one that
    must reconnect is disconnected when it comes back.
    """

    async def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> redis.asyncio.Connection:
        connection = self.get_available_connection()
        try:
            await self.ensure_connection(connection)
        except BaseException:
            await self.release(connection)
            raise
        return connection  # type: ignore[no-any-return]

    async def release(self, connection: redis.asyncio.Connection) -> None:  # type: ignore[override]
        self._in_use_connections.remove(connection)
        if connection.should_reconnect():
            await connection.disconnect()
        self._available_connections.append(connection)


class _AsyncSentinelConnection(_HiredisPacking, redis.asyncio.sentinel.SentinelManagedConnection):
    """Reconnects through the Sentinels on a retry, as ``_SentinelConnection`` does, for the API's asyncio connections."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if not self.is_connected:
            await self.connect()
        await super().send_packed_command(command, check_health)


def sync_client(url: str, retries: int = 30, sentinel_master: str | None = None) -> redis.Redis:
    """For workers: retries with backoff for about a minute, then raises."""
    options: dict[str, Any] = {
        "retry": Retry(ExponentialBackoff(cap=2.0, base=0.1), retries),
        "retry_on_error": [ConnectionError, TimeoutError],
        "socket_timeout": 15,
        "socket_connect_timeout": 5,
        "health_check_interval": 30,
    }
    if is_sentinel_url(url):
        sentinels = SentinelUrl.parse(url)
        manager = redis.sentinel.Sentinel(sentinels.sentinels, sentinel_kwargs=SENTINEL_QUERY_TIMEOUTS, **sentinels.server_options())
        return manager.master_for(_master_name(sentinel_master), redis_class=redis.Redis, connection_class=_SentinelConnection, **options)
    return redis.Redis.from_url(url, **options)


# How long the API gives Redis to answer one ordinary command before calling it unreachable: far
# above any healthy answer, far below a client's patience.
API_COMMAND_TIMEOUT_S = 5.0


def async_client(
    url: str, socket_timeout: float = API_COMMAND_TIMEOUT_S, max_connections: int = 2048, sentinel_master: str | None = None
) -> redis.asyncio.Redis:
    """For the API: fails fast, so a client gets a 503 rather than a hung request.

    ``socket_timeout`` bounds every read; a client used for blocking commands (BLPOP) must allow
    their blocking time on top of it, or redis-py cuts the wait short and reports a timeout.
    """
    options: dict[str, Any] = {
        # The asyncio Retry: the sync one would return the command's coroutine unawaited, so its
        # failure escaped unretried (a stale pooled connection after a Redis restart became a 503).
        "retry": redis.asyncio.retry.Retry(ExponentialBackoff(cap=0.2, base=0.05), 1),
        "retry_on_error": [ConnectionError],
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": 2,
        "health_check_interval": 30,
        "max_connections": max_connections,
    }
    if is_sentinel_url(url):
        sentinels = SentinelUrl.parse(url)
        manager = redis.asyncio.sentinel.Sentinel(sentinels.sentinels, sentinel_kwargs=SENTINEL_QUERY_TIMEOUTS, **sentinels.server_options())
        return manager.master_for(_master_name(sentinel_master), redis_class=redis.asyncio.Redis, connection_class=_AsyncSentinelConnection, **options)
    pool = _LeanConnectionPool.from_url(url, **options)
    pool.connection_class = _with_hiredis_packing(pool.connection_class)
    client = redis.asyncio.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True  # the pool is the client's own, as with Redis.from_url
    return client


def _master_name(sentinel_master: str | None) -> str:
    if not sentinel_master:
        raise ValueError("a sentinel:// Redis URL needs the name of the primary the Sentinels monitor (IMBEDDINGS_REDIS_SENTINEL_MASTER)")
    return sentinel_master
