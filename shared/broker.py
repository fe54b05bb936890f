"""The Redis broker transport (plain or through Sentinel), with one kombu defect worked around and a
full Redis survived.

When the broker connection drops, kombu closes the channel: it disconnects the channel's connection
pool and then tries to hand unacknowledged messages back, which needs a new pool built from the
connection's parameters. If the connection object was already detached by then,
``Channel._connparams`` raises ``AttributeError`` instead of a connection error, Celery treats it as
"unrecoverable" and the worker process exits (kombu issue #582, still in 5.7). Raising the
connection error it stands for lets Celery reconnect as it does for any outage; the messages stay
unacknowledged in Redis and the visibility-timeout sweep hands them out again.

A Redis at ``maxmemory`` with ``noeviction`` refuses every command that may grow memory. kombu
treats that refusal as fatal in three places, each of which this transport changes:

- Delivering a message moves it from its queue (``BRPOP``, always allowed) into the unacknowledged
  hash (``ZADD`` + ``HSET``, refused): the popped message would be in neither place, lost. The move
  runs as a script flagged ``allow-oom``: it stores what was just popped, so it adds no memory.
- Declaring a queue adds its binding (``SADD``, a few bytes) even when it is already there, and the
  worker's restore sweep takes a lock (``SET NX``) as soon as it polls: both refusals stopped the
  worker at start ("Unrecoverable error: OutOfMemoryError"), so no worker could start while Redis
  was full, although workers are what frees its memory. Bindings are written by an ``allow-oom``
  script; the sweep skips its turn while Redis is full.
- Handing a message back (``Reject(requeue=True)``) pushes it onto its queue: refused, the message
  stays in the unacknowledged hash and the sweep hands it out once Redis has room again.

Script flags (``#!lua flags=...``) need Redis 7 or Valkey 7.2 or later.

kombu builds a new ``redis.Redis`` for every command it sends outside the event loop (each
delivery's bookkeeping, each acknowledgement), and building one costs more than the round trip on
a local Redis (it copies the client's table of reply callbacks). The channels here build one per
connection pool and reuse it: clients are thread-safe, and a new pool (after kombu drops its pools
on a connection error) gets a new client.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import redis.exceptions
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import QoS as VirtualQoS

from shared.sentinel import SENTINEL_QUERY_TIMEOUTS, SentinelUrl, is_sentinel_url
from shared.settings import Settings

log = logging.getLogger(__name__)

# KEYS: unacked index (zset), unacked hash. ARGV: delivery tag, now, message JSON.
_TRACK_UNACKED = """#!lua flags=allow-oom
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
"""

# KEYS: the exchange's binding table, its permanent-binding set. ARGV: member.
_BIND = """#!lua flags=allow-oom
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[1])
"""

_REFRESH_BINDING = "#!lua flags=allow-oom\n" + kombu_redis.REFRESH_BINDING

REDIS_FULL = "Redis is full (maxmemory reached, noeviction)"


class QoS(kombu_redis.QoS):
    def append(self, message: Any, delivery_tag: str) -> None:
        delivery = message.delivery_info
        raw = kombu_redis.dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        with self.channel.conn_or_acquire() as client:
            self.channel._track_unacked(keys=[self.unacked_index_key, self.unacked_key], args=[delivery_tag, time.time(), raw], client=client)
        VirtualQoS.append(self, message, delivery_tag)

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        try:
            super().restore_visible(start, num, interval)
        except redis.exceptions.OutOfMemoryError:
            log.warning(f"{REDIS_FULL}: unacknowledged messages are handed out again once it has room")

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if not requeue:
            super().reject(delivery_tag, requeue)
            return
        try:
            self.restore_by_tag(delivery_tag, leftmost=True)
        except redis.exceptions.OutOfMemoryError:
            # The requeue transaction was refused as a whole, so the message is still recorded as
            # unacknowledged in Redis: the visibility-timeout sweep hands it out again.
            log.warning(f"{REDIS_FULL}: a message handed back stays unacknowledged and is delivered again after the visibility timeout")
        VirtualQoS.ack(self, delivery_tag)


class _ChannelFixes:
    """What both channels (plain and Sentinel) change in kombu's: the detached-connection error and
    the scripts that let a full Redis be survived."""

    QoS = QoS
    connection: Any
    _pool_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[misc]
        pool = self.pool  # type: ignore[attr-defined]
        if self._pool_client is None or self._pool_client.connection_pool is not pool:
            self._pool_client = super()._create_client()  # type: ignore[misc]
        return self._pool_client

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if self.connection.client is None:
            raise redis.exceptions.ConnectionError("broker connection already closed")
        return super()._connparams(asynchronous=asynchronous)  # type: ignore[misc]

    @cached_property
    def _refresh_binding(self) -> Any:
        return self._create_client().register_script(_REFRESH_BINDING)  # type: ignore[attr-defined]

    @cached_property
    def _track_unacked(self) -> Any:
        return self._create_client().register_script(_TRACK_UNACKED)  # type: ignore[attr-defined]

    @cached_property
    def _bind(self) -> Any:
        return self._create_client().register_script(_BIND)  # type: ignore[attr-defined]

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        if queue in self._expires or self.typeof(exchange).type == "fanout":  # type: ignore[attr-defined]
            super()._queue_bind(exchange, routing_key, pattern, queue)  # type: ignore[misc]  # expiring bindings: _refresh_binding
            return
        member = self.sep.join([routing_key or "", pattern or "", queue or ""])  # type: ignore[attr-defined]
        keys = [self.keyprefix_queue % (exchange,), self.keyprefix_binding_permanent % (exchange,)]  # type: ignore[attr-defined]
        with self.conn_or_acquire() as client:  # type: ignore[attr-defined]
            self._bind(keys=keys, args=[member], client=client)


class Channel(_ChannelFixes, kombu_redis.Channel):
    pass


class SentinelChannel(_ChannelFixes, kombu_redis.SentinelChannel):
    pass


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


TRANSPORT = f"{__name__}:Transport"
SENTINEL_TRANSPORT = f"{__name__}:SentinelTransport"

# kombu's failover between the URLs of a Sentinel list re-reads the transport from the next URL's
# scheme, which would swap the transport above for kombu's own, without the fix, mid-outage.
TRANSPORT_ALIASES["sentinel"] = SENTINEL_TRANSPORT


@dataclass(frozen=True)
class BrokerConnection:
    """What Celery needs to reach the broker: its URL, transport, and the transport's own options."""

    url: str
    transport: str
    transport_options: dict[str, object] = field(default_factory=dict)


def broker_connection(settings: Settings) -> BrokerConnection:
    if not is_sentinel_url(settings.redis_url):
        return BrokerConnection(settings.redis_url, TRANSPORT)
    return BrokerConnection(
        SentinelUrl.parse(settings.redis_url).kombu_url(),
        SENTINEL_TRANSPORT,
        {"master_name": settings.redis_sentinel_master, "sentinel_kwargs": SENTINEL_QUERY_TIMEOUTS},
    )
