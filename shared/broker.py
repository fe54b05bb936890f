"""The Redis broker transport, with one kombu defect worked around.

When the broker connection drops, kombu closes the channel: it disconnects the channel's connection
pool and then tries to hand unacknowledged messages back, which needs a new pool built from the
connection's parameters. If the connection object was already detached by then,
``Channel._connparams`` raises ``AttributeError`` instead of a connection error, Celery treats it as
"unrecoverable" and the worker process exits (kombu issue #582, still in 5.7). Raising the
connection error it stands for lets Celery reconnect as it does for any outage; the messages stay
unacknowledged in Redis and the visibility-timeout sweep hands them out again.
"""

from __future__ import annotations

from typing import Any

import redis.exceptions
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if self.connection.client is None:
            raise redis.exceptions.ConnectionError("broker connection already closed")
        return super()._connparams(asynchronous=asynchronous)


class Transport(kombu_redis.Transport):
    Channel = Channel


TRANSPORT = f"{__name__}:Transport"
