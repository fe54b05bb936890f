"""The Redis broker transport (plain or through Sentinel), with one kombu defect worked around.

When the broker connection drops, kombu closes the channel: it disconnects the channel's connection
pool and then tries to hand unacknowledged messages back, which needs a new pool built from the
connection's parameters. If the connection object was already detached by then,
``Channel._connparams`` raises ``AttributeError`` instead of a connection error, Celery treats it as
"unrecoverable" and the worker process exits (kombu issue #582, still in 5.7). Raising the
connection error it stands for lets Celery reconnect as it does for any outage; the messages stay
unacknowledged in Redis and the visibility-timeout sweep hands them out again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import redis.exceptions
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis

from shared.sentinel import SENTINEL_QUERY_TIMEOUTS, SentinelUrl, is_sentinel_url
from shared.settings import Settings


class _DetachedConnectionIsConnectionError:
    connection: Any

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if self.connection.client is None:
            raise redis.exceptions.ConnectionError("broker connection already closed")
        return super()._connparams(asynchronous=asynchronous)  # type: ignore[misc]


class Channel(_DetachedConnectionIsConnectionError, kombu_redis.Channel):
    pass


class SentinelChannel(_DetachedConnectionIsConnectionError, kombu_redis.SentinelChannel):
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
