"""The admission ledger of synchronous requests, per model (``admitted:<model>``, ``admitted-images:<model>``),
and the one script that admits synchronous requests.

The ledger lives in Redis so every API instance sees the same queue. Each admitted request is an
entry scored by its deadline with its image count beside it; the running total of images is kept
in the same hash. Entries leave when the request is answered or withdrawn, and an entry whose API
process died is purged once its deadline has passed, so the ledger heals itself.

A request is admitted in one round trip (``ADMIT_REQUESTS``, which weighs the requests an API process
admitted together one after the other, and queues their one task): whether a live worker serves the model,
the key's quota (``shared.store.tenants``' Lua functions), Redis's memory (``INFO memory``, read in
the script), the expected wait at the speed the live workers published (``shared.store.registry``),
and this ledger, checked in that order; the first that refuses answers, and only a request that
passes them all is entered in the key's quota and the ledger. Its reply is taken, and the request
released, by ``TAKE_REPLY`` in the round trip of the wait; ``RELEASE_REQUEST`` releases a request
withdrawn without an answer. The policy (what a refusal says, with which status) is ``api.admission``'s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis.asyncio
from redis.asyncio.client import Pipeline as AsyncPipeline

from shared.queues import model_slug, queue_for
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

# Admits the requests of one model given to it, one after the other, each seeing the ones before it.
# KEYS: the model's worker registry, its speeds, its ledger (entries, counts), its task queue, then
# for each request: its key's quota (work, images), its image-bytes hash. ARGV: now, the keys' limit,
# the memory budget ('' for none), timeout s, max requests, the ttl s of ledger entries and image
# bytes, the task message ('' for none), then for each request: work id, deadline, images, bytes needed, bytes
# its API process is storing, the number of image-bytes pairs, then index, bytes for each: an
# admitted request's bytes are stored here. The task goes after the bytes, in the same atomic step,
# and only when every request was admitted (the caller queues a task without the refused ones).
# Returns {1 when the task was queued else 0, verdict...}, a verdict being {'admitted', used_memory,
# maxmemory, total_system_memory} or the first refusal: {'not_served'}, {'over_key_limit'},
# {'key_quota', queued, s/img}, {'redis_full', used_memory, maxmemory, total_system_memory},
# {'exceeds_timeout', s/img}, {'depth', requests, s/img}, {'wait', ms}.
# Seconds per image travel as text (a Lua number would reach Python as an integer); 0: not measured.
ADMIT_REQUESTS = (
    SPEED_FUNCTIONS
    + QUOTA_FUNCTIONS
    + LEDGER_FUNCTIONS
    + """
local now = tonumber(ARGV[1])
local key_limit = tonumber(ARGV[2])
local timeout = tonumber(ARGV[4])
local per_image, served = live_seconds_per_image(KEYS[1], KEYS[2], now)
local per_image_text = string.format('%.17g', per_image)
local memory = nil
local used, maxmemory, host
local purged = false

local function admit(quota_work, quota_images, blobs, a)
  if not served then
    return {'not_served'}
  end
  local images = tonumber(ARGV[a + 2])
  if images > key_limit then
    return {'over_key_limit'}
  end
  local queued = quota_purge(quota_work, quota_images, now)
  if queued + images > key_limit then
    return {'key_quota', queued, per_image_text}
  end
  if not memory then
    memory = redis.call('INFO', 'memory')
    used = string.match(memory, '\\nused_memory:(%d+)')
    maxmemory = string.match(memory, '\\nmaxmemory:(%d+)') or '0'
    host = string.match(memory, '\\ntotal_system_memory:(%d+)') or '0'
  end
  if ARGV[3] ~= '' and tonumber(used) + tonumber(ARGV[a + 4]) + tonumber(ARGV[a + 3]) > tonumber(ARGV[3]) then
    return {'redis_full', used, maxmemory, host}
  end
  if per_image > 0 and images * per_image > timeout then
    return {'exceeds_timeout', per_image_text}
  end
  if not purged then
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
      ledger_release(KEYS[3], KEYS[4], id)
    end
    purged = true
  end
  local requests = redis.call('ZCARD', KEYS[3])
  if requests >= tonumber(ARGV[5]) then
    return {'depth', requests, per_image_text}
  end
  local ahead = tonumber(redis.call('HGET', KEYS[4], 'total') or '0')
  local wait = (ahead + images) * per_image
  if wait > timeout then
    return {'wait', math.floor(wait * 1000)}
  end

  local work_id = ARGV[a]
  local deadline = tonumber(ARGV[a + 1])
  quota_add(quota_work, quota_images, work_id, deadline, images, now)
  redis.call('ZADD', KEYS[3], deadline, work_id)
  redis.call('HSET', KEYS[4], work_id, images)
  redis.call('HINCRBY', KEYS[4], 'total', images)
  redis.call('EXPIRE', KEYS[3], ARGV[6])
  redis.call('EXPIRE', KEYS[4], ARGV[6])
  local pairs_count = tonumber(ARGV[a + 5])
  if pairs_count > 0 then
    redis.call('HSET', blobs, unpack(ARGV, a + 6, a + 5 + 2 * pairs_count))
    redis.call('EXPIRE', blobs, ARGV[6])
  end
  return {'admitted', used, maxmemory, host}
end

local verdicts = {0}
local all_admitted = true
local a = 8
local k = 6
while a <= #ARGV do
  local verdict = admit(KEYS[k], KEYS[k + 1], KEYS[k + 2], a)
  all_admitted = all_admitted and verdict[1] == 'admitted'
  verdicts[#verdicts + 1] = verdict
  a = a + 6 + 2 * tonumber(ARGV[a + 5])
  k = k + 3
end
if all_admitted and ARGV[7] ~= '' then
  redis.call('LPUSH', KEYS[5], ARGV[7])
  verdicts[1] = 1
end
return verdicts
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
    """The task message of admitted requests, for the queue named ``queue``."""

    queue: str
    message: bytes


@dataclass(frozen=True)
class RequestAsk:
    """What one synchronous request asks of the service, as the admission script weighs it."""

    key_id: str
    work_id: str
    images: int
    deadline: float
    bytes_needed: int
    bytes_in_flight: int  # what its API process's other submissions are storing now
    blobs_key: str
    stored_images: list[tuple[int, bytes]]  # stored with the admission; [] for a request whose bytes follow on their own


@dataclass(frozen=True)
class AdmissionLimits:
    """What every request of an API process is weighed against."""

    key_limit: int
    memory_budget: int | None
    timeout_s: float
    max_requests: int
    ttl_s: int  # of what an admission stores: ledger entries and image bytes


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
        self._admit = redis.register_script(ADMIT_REQUESTS)
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

    async def admit(self, model: str, limits: AdmissionLimits, asks: list[RequestAsk], task: QueuedTask | None) -> tuple[list[Verdict], bool]:
        """Each request's verdict, in order, and whether ``task`` was queued: it is, in the same step,
        when every request was admitted."""
        workers, speeds, entries, counts = self._for_model(model)
        # The model's queue is named even without a task: a Redis ACL may allow only the service's key patterns.
        keys = [workers, speeds, entries, counts, queue_for(model, "interactive") if task is None else task.queue]
        args: list[str | int | float | bytes] = [
            time.time(),
            limits.key_limit,
            "" if limits.memory_budget is None else limits.memory_budget,
            limits.timeout_s,
            limits.max_requests,
            limits.ttl_s,
            "" if task is None else task.message,
        ]
        for ask in asks:
            keys += [*self._for_key(ask.key_id), ask.blobs_key]
            args += [ask.work_id, ask.deadline, ask.images, ask.bytes_needed, ask.bytes_in_flight, len(ask.stored_images)]
            for index, data in ask.stored_images:
                args += [index, data]
        queued, *answers = await self._admit(keys=keys, args=args)
        return [_verdict(answer) for answer in answers], bool(queued)

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


def _verdict(answer: list[bytes]) -> Verdict:
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
