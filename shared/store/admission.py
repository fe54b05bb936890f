"""The admission ledger of synchronous requests, per model (``admitted:<model>``, ``admitted-images:<model>``).

The ledger lives in Redis so every API instance sees the same queue. Each admitted request is an
entry scored by its deadline with its image count beside it; the running total of images is kept
in the same hash. Entries leave when the request is answered or withdrawn, and an entry whose API
process died is purged once its deadline has passed, so the ledger heals itself. The admission
policy (what a refusal says) is ``api.admission``'s.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import redis.asyncio

from shared.queues import model_slug

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
class LedgerKeys:
    prefix: str

    def admitted(self, model_id: str) -> str:
        """Sorted set: requests admitted for a model and not yet answered, scored by deadline."""
        return f"{self.prefix}admitted:{model_slug(model_id)}"

    def admitted_images(self, model_id: str) -> str:
        """Hash: request -> its image count, plus the running total under ``total``."""
        return f"{self.prefix}admitted-images:{model_slug(model_id)}"


@dataclass(frozen=True)
class Refusal:
    reason: str  # 'depth': too many requests waiting; 'wait': the expected wait exceeds the timeout
    value: int  # requests waiting, or the expected wait in milliseconds


class AdmissionStore:
    def __init__(self, redis: redis.asyncio.Redis, prefix: str) -> None:
        self._keys = LedgerKeys(prefix)
        self._admit = redis.register_script(ADMIT)
        self._release = redis.register_script(RELEASE)

    def _ledger(self, model: str) -> list[str]:
        return [self._keys.admitted(model), self._keys.admitted_images(model)]

    async def admit(
        self, model: str, work_id: str, images: int, deadline: float, seconds_per_image: float, timeout_s: float, max_requests: int
    ) -> Refusal | None:
        """Enter the request in the model's ledger, or say why not (None: admitted)."""
        args = [time.time(), work_id, deadline, images, seconds_per_image, timeout_s, max_requests, math.ceil(timeout_s) + 60]
        verdict = await self._admit(keys=self._ledger(model), args=args)
        if int(verdict[0]) == 1:
            return None
        return Refusal(verdict[1].decode(), int(verdict[2]))

    async def release(self, model: str, work_id: str) -> None:
        await self._release(keys=self._ledger(model), args=[work_id])
