"""Admission of synchronous requests: refuse up front the work that would only time out.

The ledger lives in Redis so every API instance sees the same queue. Each admitted request is an
entry scored by its deadline with its image count beside it; the running total of images is kept
in the same hash. Entries leave when the request is answered or withdrawn, and an entry whose API
process died is purged once its deadline has passed, so the ledger heals itself.

The expected wait of a new request is the images ahead of it (and its own) times the seconds the
model's workers need per image, which the workers measure and publish (``shared.store.registry``).
When that exceeds the request timeout, the answer is 429 with a ``Retry-After`` computed from the
excess, rather than a request accepted only to end in 504.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import redis.asyncio

from api.errors import ApiError
from shared.keys import Keys
from shared.store.registry import ModelRegistry

# KEYS: ledger (zset id -> deadline), images (hash id -> count, plus 'total').
# ARGV: now, id, deadline, images, seconds per image (0: unknown), timeout s, max requests, key ttl s.
# Returns {1} when admitted; {0, 'depth', requests} or {0, 'wait', wait_ms} when refused.
ADMIT = """
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
for _, id in ipairs(expired) do
  local n = redis.call('HGET', KEYS[2], id)
  if n then
    redis.call('HINCRBY', KEYS[2], 'total', -tonumber(n))
    redis.call('HDEL', KEYS[2], id)
  end
  redis.call('ZREM', KEYS[1], id)
end
local requests = redis.call('ZCARD', KEYS[1])
if requests >= tonumber(ARGV[7]) then
  return {0, 'depth', requests}
end
local images = tonumber(ARGV[4])
local ahead = tonumber(redis.call('HGET', KEYS[2], 'total') or '0')
local wait = (ahead + images) * tonumber(ARGV[5])
if wait > tonumber(ARGV[6]) then
  return {0, 'wait', math.floor(wait * 1000)}
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], images)
redis.call('HINCRBY', KEYS[2], 'total', images)
redis.call('EXPIRE', KEYS[1], ARGV[8])
redis.call('EXPIRE', KEYS[2], ARGV[8])
return {1}
"""

# KEYS: ledger, images. ARGV: id. Removes the entry once; a second release changes nothing.
RELEASE = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  local n = redis.call('HGET', KEYS[2], ARGV[1])
  if n then
    redis.call('HINCRBY', KEYS[2], 'total', -tonumber(n))
    redis.call('HDEL', KEYS[2], ARGV[1])
  end
end
"""


@dataclass(frozen=True)
class Admission:
    """A request's place in the ledger; release it exactly when its wait ends."""

    model: str
    work_id: str


class AdmissionLedger:
    def __init__(self, redis: redis.asyncio.Redis, keys: Keys, registry: ModelRegistry, request_timeout_s: float, max_requests: int) -> None:
        self._redis = redis
        self._keys = keys
        self._registry = registry
        self._timeout_s = request_timeout_s
        self._max_requests = max_requests
        self._admit = redis.register_script(ADMIT)
        self._release = redis.register_script(RELEASE)

    async def seconds_per_image(self, model: str) -> float:
        """How long the model's live workers together take per image; 0 while none has measured.

        Workers run in parallel, so their rates add up: 1 / sum(1 / s_w).
        """
        rate = sum(1.0 / seconds for seconds in await self._registry.live_speeds(model))
        return 1.0 / rate if rate > 0 else 0.0

    async def admit(self, model: str, work_id: str, images: int, deadline: float) -> Admission:
        timeout = self._timeout_s
        per_image = await self.seconds_per_image(model)
        if per_image > 0 and images * per_image > timeout:
            raise ApiError(
                400,
                f"{images} images need about {images * per_image:.0f} s of the model's time, more than the request timeout of {timeout:g} s; "
                "send fewer per request or submit a job (POST /v1/jobs)",
                code="request_exceeds_timeout",
                param="input",
            )
        keys = [self._keys.admitted(model), self._keys.admitted_images(model)]
        args = [time.time(), work_id, deadline, images, per_image, timeout, self._max_requests, math.ceil(timeout) + 60]
        verdict = await self._admit(keys=keys, args=args)
        if int(verdict[0]) == 1:
            return Admission(model, work_id)
        if verdict[1] == b"depth":
            retry = _retry_after(per_image * images) if per_image > 0 else "2"
            raise ApiError(429, f"model {model!r} has {int(verdict[2])} requests waiting (limit {self._max_requests}); retry later", code="queue_full", headers={"Retry-After": retry})
        wait_s = int(verdict[2]) / 1000
        raise ApiError(
            429,
            f"model {model!r} is busy: this request would wait about {wait_s:.0f} s, longer than the request timeout of {timeout:g} s; retry later",
            code="queue_full",
            headers={"Retry-After": _retry_after(wait_s - timeout)},
        )

    async def release(self, admission: Admission) -> None:
        keys = [self._keys.admitted(admission.model), self._keys.admitted_images(admission.model)]
        await self._release(keys=keys, args=[admission.work_id])


def _retry_after(excess_s: float) -> str:
    return str(max(1, math.ceil(excess_s)))
