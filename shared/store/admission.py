"""The admission ledger of synchronous requests, per model (``admitted:<model>``, ``admitted-images:<model>``),
and the one script that admits a synchronous request.

The ledger lives in Redis so every API instance sees the same queue. Each admitted request is an
entry scored by its deadline with its image count beside it; the running total of images is kept
in the same hash. Entries leave when the request is answered or withdrawn, and an entry whose API
process died is purged once its deadline has passed, so the ledger heals itself.

A request is admitted in one round trip (``ADMIT_REQUEST``): whether a live worker serves the model,
the key's quota (``shared.store.tenants``' Lua functions), Redis's memory (``INFO memory``, read in
the script), the expected wait at the speed the live workers published (``shared.store.registry``),
and this ledger, checked in that order; the first that refuses answers, and only a request that
passes them all is entered in the key's quota and the ledger. Its reply is taken, and the request
released, by ``TAKE_REPLY`` in the round trip of the wait; ``RELEASE_REQUEST`` releases a request
withdrawn without an answer. The policy (what a refusal says, with which status) is ``api.admission``'s.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import redis.asyncio
from redis.asyncio.client import Pipeline as AsyncPipeline

from shared.queues import model_slug
from shared.store.registry import SPEED_FUNCTIONS, RegistryKeys
from shared.store.tenants import QUOTA_FUNCTIONS, TenantKeys

# Lua: a request leaves the ledger (once; a second release changes nothing).
LEDGER_FUNCTIONS = """
local function ledger_release(ledger, counts, id)
  if redis.call('ZREM', ledger, id) == 1 then
    local n = redis.call('HGET', counts, id)
    if n then
      redis.call('HINCRBY', counts, 'total', -tonumber(n))
      redis.call('HDEL', counts, id)
    end
  end
end
"""

# KEYS: the model's worker registry, its speeds, the key's quota (work, images), the model's ledger
# (entries, counts), the request's image-bytes hash, the model's task queue. ARGV: now, work id,
# deadline, images, the key's limit, bytes needed, bytes this API process is storing, the memory
# budget ('' for none), timeout s, max requests, ledger ttl s, image-bytes ttl s, then either '' or
# the task message followed by index, bytes pairs: an admitted request's bytes and task are then
# stored here too (the task after its bytes, in the same atomic step).
# Returns {'admitted', used_memory, maxmemory, total_system_memory} or the first refusal:
# {'not_served'}, {'over_key_limit'}, {'key_quota', queued, s/img}, {'redis_full', used_memory,
# maxmemory, total_system_memory}, {'exceeds_timeout', s/img}, {'depth', requests, s/img}, {'wait', ms}.
# Seconds per image travel as text (a Lua number would reach Python as an integer); 0: not measured.
ADMIT_REQUEST = (
    SPEED_FUNCTIONS
    + QUOTA_FUNCTIONS
    + LEDGER_FUNCTIONS
    + """
local now = tonumber(ARGV[1])
local per_image, served = live_seconds_per_image(KEYS[1], KEYS[2], now)
if not served then
  return {'not_served'}
end
local per_image_text = string.format('%.17g', per_image)

local images = tonumber(ARGV[4])
local key_limit = tonumber(ARGV[5])
if images > key_limit then
  return {'over_key_limit'}
end
local queued = quota_purge(KEYS[3], KEYS[4], now)
if queued + images > key_limit then
  return {'key_quota', queued, per_image_text}
end

local memory = redis.call('INFO', 'memory')
local used = string.match(memory, '\\nused_memory:(%d+)')
local maxmemory = string.match(memory, '\\nmaxmemory:(%d+)') or '0'
local host = string.match(memory, '\\ntotal_system_memory:(%d+)') or '0'
if ARGV[8] ~= '' and tonumber(used) + tonumber(ARGV[7]) + tonumber(ARGV[6]) > tonumber(ARGV[8]) then
  return {'redis_full', used, maxmemory, host}
end

local timeout = tonumber(ARGV[9])
if per_image > 0 and images * per_image > timeout then
  return {'exceeds_timeout', per_image_text}
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now)) do
  ledger_release(KEYS[5], KEYS[6], id)
end
local requests = redis.call('ZCARD', KEYS[5])
if requests >= tonumber(ARGV[10]) then
  return {'depth', requests, per_image_text}
end
local ahead = tonumber(redis.call('HGET', KEYS[6], 'total') or '0')
local wait = (ahead + images) * per_image
if wait > timeout then
  return {'wait', math.floor(wait * 1000)}
end

local deadline = tonumber(ARGV[3])
quota_add(KEYS[3], KEYS[4], ARGV[2], deadline, images, now)
redis.call('ZADD', KEYS[5], deadline, ARGV[2])
redis.call('HSET', KEYS[6], ARGV[2], images)
redis.call('HINCRBY', KEYS[6], 'total', images)
redis.call('EXPIRE', KEYS[5], ARGV[11])
redis.call('EXPIRE', KEYS[6], ARGV[11])
if ARGV[13] ~= '' then
  if #ARGV > 13 then
    redis.call('HSET', KEYS[7], unpack(ARGV, 14))
    redis.call('EXPIRE', KEYS[7], ARGV[12])
  end
  redis.call('LPUSH', KEYS[8], ARGV[13])
end
return {'admitted', used, maxmemory, host}
"""
)

# KEYS: the model's ledger (entries, counts), the key's quota (work, images). ARGV: work id.
# Idempotent: a second release changes nothing.
RELEASE_REQUEST = (
    QUOTA_FUNCTIONS
    + LEDGER_FUNCTIONS
    + """
ledger_release(KEYS[1], KEYS[2], ARGV[1])
quota_release(KEYS[3], KEYS[4], ARGV[1])
"""
)


# KEYS: the request's reply list, the model's ledger (entries, counts), the key's quota (work, images).
# ARGV: work id. Queued right behind the wait for the reply (a BLMOVE of the reply list onto itself,
# which leaves the reply in its list), on the same connection: takes the reply, if the wait saw one,
# and releases the request with it, so the answer and the release cost one round trip.
TAKE_REPLY = (
    QUOTA_FUNCTIONS
    + LEDGER_FUNCTIONS
    + """
local reply = redis.call('LPOP', KEYS[1])
if reply then
  ledger_release(KEYS[2], KEYS[3], ARGV[1])
  quota_release(KEYS[4], KEYS[5], ARGV[1])
end
return reply
"""
)


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
class QueuedTask:
    """A request's image bytes and its task message, for the queue named ``queue``."""

    blobs_key: str
    images: list[tuple[int, bytes]]
    ttl_s: int
    queue: str
    message: bytes


@dataclass(frozen=True)
class RequestAsk:
    """What one synchronous request asks of the service, as the admission script weighs it; with
    ``store_task`` the script also stores the bytes and queues the task of a request it admits."""

    key_id: str
    model: str
    work_id: str
    images: int
    deadline: float
    key_limit: int
    bytes_needed: int
    bytes_in_flight: int
    memory_budget: int | None
    timeout_s: float
    max_requests: int
    task: QueuedTask
    store_task: bool


@dataclass(frozen=True)
class RedisMemory:
    """``INFO memory`` as the admission script read it."""

    used: int
    maxmemory: int
    total_system_memory: int


@dataclass(frozen=True)
class Verdict:
    """``reason`` is 'admitted' or the refusal; the other fields are filled where the reason has them."""

    reason: str
    memory: RedisMemory | None = None
    queued: int = 0  # 'key_quota': the key's unfinished images; 'depth': requests waiting
    seconds_per_image: float = 0.0  # of the live workers together; 0 while none has measured
    wait_ms: int = 0  # 'wait': the expected wait


class AdmissionStore:
    """The API's side: admit a synchronous request (one script), release it when its wait ends."""

    def __init__(self, redis: redis.asyncio.Redis, prefix: str) -> None:
        self._keys = LedgerKeys(prefix)
        self._registry = RegistryKeys(prefix)
        self._tenants = TenantKeys(prefix)
        self._admit = redis.register_script(ADMIT_REQUEST)
        self._release = redis.register_script(RELEASE_REQUEST)
        self._take_reply = redis.register_script(TAKE_REPLY)
        # Key names per model and per API key, built once: both come from bounded lists (the allow-list, the configured keys).
        self._model_keys: dict[str, tuple[str, str, str, str]] = {}
        self._tenant_keys: dict[str, list[str]] = {}

    def _for_model(self, model: str) -> tuple[str, str, str, str]:
        """The model's worker registry, its speeds, its ledger's entries and counts."""
        keys = self._model_keys.get(model)
        if keys is None:
            keys = self._model_keys[model] = (
                self._registry.workers(model),
                self._registry.speeds(model),
                self._keys.admitted(model),
                self._keys.admitted_images(model),
            )
        return keys

    def _for_key(self, key_id: str) -> list[str]:
        keys = self._tenant_keys.get(key_id)
        if keys is None:
            keys = self._tenant_keys[key_id] = self._tenants.ledger(key_id)
        return keys

    async def admit(self, ask: RequestAsk) -> Verdict:
        task = ask.task
        workers, speeds, entries, counts = self._for_model(ask.model)
        keys = [workers, speeds, *self._for_key(ask.key_id), entries, counts, task.blobs_key, task.queue]
        args: list[str | int | float | bytes] = [
            time.time(),
            ask.work_id,
            ask.deadline,
            ask.images,
            ask.key_limit,
            ask.bytes_needed,
            ask.bytes_in_flight,
            "" if ask.memory_budget is None else ask.memory_budget,
            ask.timeout_s,
            ask.max_requests,
            math.ceil(ask.timeout_s) + 60,
        ]
        args += [task.ttl_s, task.message if ask.store_task else ""]
        if ask.store_task:
            for index, data in task.images:
                args += [index, data]
        answer = await self._admit(keys=keys, args=args)
        reason = answer[0].decode()
        if reason in ("admitted", "redis_full"):
            return Verdict(reason, memory=RedisMemory(*(int(value) for value in answer[1:4])))
        if reason in ("key_quota", "depth"):
            return Verdict(reason, queued=int(answer[1]), seconds_per_image=float(answer[2]))
        if reason == "exceeds_timeout":
            return Verdict(reason, seconds_per_image=float(answer[1]))
        if reason == "wait":
            return Verdict(reason, wait_ms=int(answer[1]))
        return Verdict(reason)

    async def release(self, key_id: str, model: str, work_id: str) -> None:
        _, _, entries, counts = self._for_model(model)
        await self._release(keys=[entries, counts, *self._for_key(key_id)], args=[work_id])

    def _take_keys(self, reply_key: str, key_id: str, model: str) -> list[str]:
        _, _, entries, counts = self._for_model(model)
        return [reply_key, entries, counts, *self._for_key(key_id)]

    def queue_take_reply(self, pipe: AsyncPipeline, reply_key: str, key_id: str, model: str, work_id: str) -> None:
        """Queue on ``pipe``, behind the wait for the reply: take it and, when there is one, release the request.

        Queued by its digest alone (a pipeline's scripts would cost a ``SCRIPT EXISTS`` round trip on every
        execution); where Redis has lost the script (a restart), ``take_reply`` does the same after the wait."""
        keys = self._take_keys(reply_key, key_id, model)
        pipe.evalsha(self._take_reply.sha, len(keys), *keys, work_id)

    async def take_reply(self, reply_key: str, key_id: str, model: str, work_id: str) -> bytes | None:
        """``queue_take_reply``'s step on its own."""
        reply: bytes | None = await self._take_reply(keys=self._take_keys(reply_key, key_id, model), args=[work_id])
        return reply
