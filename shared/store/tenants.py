"""Per-key quota of unfinished images, kept in Redis: the one owner of ``tenant:<key>:work`` and
``tenant:<key>:images`` (``TenantKeys``).

Work is admitted against the key's limit in one script (``ADMIT``), so concurrent requests of one
key on any number of API instances cannot overshoot it. An entry shrinks as a job's items finish
(``settle``, inside the job scripts), and leaves when its request is answered or withdrawn, its
job completes or is cancelled, or, should nobody say so (an API process died), when its expiry
passes: every admission purges lapsed entries first, so the ledger heals itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis.asyncio


@dataclass(frozen=True)
class TenantKeys:
    prefix: str

    def work(self, key_id: str) -> str:
        """Sorted set: an API key's unfinished work (synchronous requests and jobs) -> the time its
        claim on the key's quota lapses by itself (a request's deadline, a job's expiry)."""
        return f"{self.prefix}tenant:{key_id}:work"

    def images(self, key_id: str) -> str:
        """Hash: work id -> images of it not finished yet, plus the key's sum under ``total``."""
        return f"{self.prefix}tenant:{key_id}:images"

    def ledger(self, key_id: str) -> list[str]:
        """The KEYS the quota functions take for one key: work, images."""
        return [self.work(key_id), self.images(key_id)]


# Lua helpers the job scripts (shared.store.jobs), the synchronous admission (shared.store.admission)
# and the quota scripts share. `work` is the key's sorted set of work id -> expiry, `images` its hash
# of work id -> unfinished images plus 'total'.
QUOTA_FUNCTIONS = """
local function quota_keep(key, ttl)
  if redis.call('TTL', key) < ttl then
    redis.call('EXPIRE', key, ttl)
  end
end
local function quota_release(work, images, id)
  local n = redis.call('HGET', images, id)
  if n then
    redis.call('HINCRBY', images, 'total', -tonumber(n))
    redis.call('HDEL', images, id)
  end
  redis.call('ZREM', work, id)
  if redis.call('ZCARD', work) == 0 then
    -- Nothing left to count: a key's ledger does not outlive its work (the zset is gone already).
    redis.call('DEL', images)
  end
end
-- Drops the key's lapsed entries; returns its unfinished images.
local function quota_purge(work, images, now)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', work, '-inf', now)) do
    quota_release(work, images, id)
  end
  return tonumber(redis.call('HGET', images, 'total') or '0')
end
local function quota_add(work, images, id, expiry, count, now)
  redis.call('ZADD', work, expiry, id)
  redis.call('HSET', images, id, count)
  redis.call('HINCRBY', images, 'total', count)
  local ttl = math.ceil(expiry - now) + 60
  quota_keep(work, ttl)
  quota_keep(images, ttl)
end
local function quota_settle(work, images, id, done, ttl, now)
  local n = redis.call('HGET', images, id)
  if n and done > 0 then
    local settled = math.min(tonumber(n), done)
    redis.call('HINCRBY', images, id, -settled)
    redis.call('HINCRBY', images, 'total', -settled)
  end
  if n then
    redis.call('ZADD', work, 'XX', now + ttl, id)
    quota_keep(work, ttl + 60)
    quota_keep(images, ttl + 60)
  end
end
"""

# KEYS: work, images. ARGV: now, work id, expiry, images, limit.
# Returns {1, total} when admitted (total includes this work), {0, total} when refused.
ADMIT = (
    QUOTA_FUNCTIONS
    + """
local now = tonumber(ARGV[1])
local total = quota_purge(KEYS[1], KEYS[2], now)
local images = tonumber(ARGV[4])
if total + images > tonumber(ARGV[5]) then
  return {0, total}
end
quota_add(KEYS[1], KEYS[2], ARGV[2], tonumber(ARGV[3]), images, now)
return {1, total + images}
"""
)

# KEYS: work, images. ARGV: work id. Idempotent.
RELEASE = (
    QUOTA_FUNCTIONS
    + """
quota_release(KEYS[1], KEYS[2], ARGV[1])
"""
)


class TenantLedger:
    """The API's side of the quota: admit work against a key's limit, release it when answered.
    The job scripts settle and release jobs' entries themselves (``QUOTA_FUNCTIONS``)."""

    def __init__(self, redis: redis.asyncio.Redis, prefix: str) -> None:
        self._keys = TenantKeys(prefix)
        self._admit = redis.register_script(ADMIT)
        self._release = redis.register_script(RELEASE)

    async def admit(self, key_id: str, work_id: str, images: int, limit: int, expires_at: float) -> tuple[bool, int]:
        """Whether the work fits under ``limit``, and the key's unfinished images (this work included
        when admitted). Entries whose expiry has passed are purged first."""
        verdict = await self._admit(keys=self._keys.ledger(key_id), args=[time.time(), work_id, expires_at, images, limit])
        return int(verdict[0]) == 1, int(verdict[1])

    async def release(self, key_id: str, work_id: str) -> None:
        """Idempotent."""
        await self._release(keys=self._keys.ledger(key_id), args=[work_id])
