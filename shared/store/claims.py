"""Which worker holds a synchronous request (``claim:<reply>``): written by the worker that starts it,
read by the API.

The API waits on a request for at most its deadline, while the broker hands an unacknowledged task
to another worker only after its visibility timeout, which is longer. So the worker that starts a
request claims it under its own name, and the waiting API, seeing that worker drop out of the
model's heartbeat registry, sends the request again within the deadline.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from enum import IntEnum

import redis.asyncio
from redis import Redis
from redis.client import Pipeline

from shared.store.registry import RegistryKeys

# KEYS: claim, the model's worker registry. ARGV: now. Returns a HolderState; a lost holder's claim
# is cleared, so the request is sent again once per lost holder.
HOLDER_STATE = """
if redis.call('ZCOUNT', KEYS[2], ARGV[1], '+inf') == 0 then
  return 3
end
local holder = redis.call('GET', KEYS[1])
if not holder then
  return 0
end
local expiry = redis.call('ZSCORE', KEYS[2], holder)
if expiry and tonumber(expiry) > tonumber(ARGV[1]) then
  return 1
end
redis.call('DEL', KEYS[1])
return 2
"""


class HolderState(IntEnum):
    NOT_STARTED = 0  # no worker has started the request yet
    HELD = 1  # the worker that started it is alive
    HOLDER_LOST = 2  # that worker stopped heartbeating
    NO_WORKER = 3  # no live worker serves the model at all


@dataclass(frozen=True)
class ClaimKeys:
    prefix: str

    def claim(self, reply_key: str) -> str:
        """Name of the worker that started the synchronous request answered on ``reply_key``."""
        return f"{self.prefix}claim:{reply_key}"


def claim(redis: Redis | Pipeline, prefix: str, reply_key: str, worker_name: str, deadline: float) -> None:
    """Mark the request as started by ``worker_name`` until a little past its deadline (queued, when
    ``redis`` is a pipeline)."""
    redis.set(ClaimKeys(prefix).claim(reply_key), worker_name, ex=max(1, math.ceil(deadline - time.time()) + 5))


class ClaimWatch:
    """The API's side: the state of a request's holder, checked between slices of its wait."""

    def __init__(self, redis: redis.asyncio.Redis, prefix: str) -> None:
        self._claims = ClaimKeys(prefix)
        self._registry = RegistryKeys(prefix)
        self._holder_state = redis.register_script(HOLDER_STATE)

    async def holder_state(self, reply_key: str, model: str) -> HolderState:
        keys = [self._claims.claim(reply_key), self._registry.workers(model)]
        return HolderState(int(await self._holder_state(keys=keys, args=[time.time()])))
