"""Redis clients that ride out a short outage (a restart) instead of failing the work in hand."""

from __future__ import annotations

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError
from redis.retry import Retry


def sync_client(url: str, retries: int = 30) -> redis.Redis:
    """For workers: retries with backoff for about a minute, then raises."""
    return redis.Redis.from_url(
        url,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), retries),
        retry_on_error=[ConnectionError, TimeoutError],
        socket_timeout=15,
        socket_connect_timeout=5,
        health_check_interval=30,
    )


# How long the API gives Redis to answer one ordinary command before calling it unreachable: far
# above any healthy answer, far below a client's patience.
API_COMMAND_TIMEOUT_S = 5.0


def async_client(url: str, socket_timeout: float = API_COMMAND_TIMEOUT_S, max_connections: int = 2048) -> redis.asyncio.Redis:
    """For the API: fails fast, so a client gets a 503 rather than a hung request.

    ``socket_timeout`` bounds every read; a client used for blocking commands (BLPOP) must allow
    their blocking time on top of it, or redis-py cuts the wait short and reports a timeout.
    """
    return redis.asyncio.Redis.from_url(
        url,
        # The asyncio Retry: the synchronous one returns the command's coroutine unawaited, so a
        # failure was never retried and the first command on each connection a Redis restart had
        # closed answered 503.
        retry=AsyncRetry(ExponentialBackoff(cap=0.2, base=0.05), 1),
        retry_on_error=[ConnectionError],
        socket_timeout=socket_timeout,
        socket_connect_timeout=2,
        health_check_interval=30,
        max_connections=max_connections,
    )
