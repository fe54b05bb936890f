"""The worker registry: which workers serve each model, how fast, and what each model looks like.

Workers write it with every heartbeat (``WorkerRegistry.beat``) and withdraw from it when they stop;
the API reads it to answer 503 instead of hanging, to estimate how long a queue takes to drain, and
to describe models in ``/v1/models``; the worker's exec probe reads it to tell Kubernetes whether its
worker is announced. Three structures, all owned here:

- ``workers:<model>``: sorted set, worker name -> expiry time of its last heartbeat;
- ``speed:<model>``: hash, worker name -> seconds per image that worker measured for the model
  (forward pass per image, smoothed);
- ``model-info``: hash, model id -> ``ModelInfo`` JSON, written when a worker announces the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis.asyncio
from redis import Redis
from redis.asyncio.client import Pipeline as AsyncPipeline

from shared.protocol import ModelInfo
from shared.queues import model_slug

# KEYS: model-info hash, then for each model its worker set and its speed hash. ARGV: worker name,
# now, expiry, then for each model its id, info JSON and seconds per image ('' while unmeasured).
# Flagged allow-oom: a beat rewrites entries of fixed size, and a worker that could not announce
# itself while Redis is full would be invisible to the API, although workers are what frees Redis's
# memory (they drop image bytes as they store results).
BEAT = """#!lua flags=allow-oom
local models = (#KEYS - 1) / 2
for m = 1, models do
  local workers, speeds = KEYS[2 * m], KEYS[2 * m + 1]
  local arg = 3 + 3 * (m - 1)
  redis.call('ZADD', workers, ARGV[3], ARGV[1])
  redis.call('ZREMRANGEBYSCORE', workers, '-inf', ARGV[2])
  redis.call('HSET', KEYS[1], ARGV[arg + 1], ARGV[arg + 2])
  if ARGV[arg + 3] ~= '' then
    redis.call('HSET', speeds, ARGV[1], ARGV[arg + 3])
    redis.call('EXPIRE', speeds, math.ceil(tonumber(ARGV[3]) - tonumber(ARGV[2])) + 60)
  end
end
"""


# Lua: the seconds per image of a model's live workers together, and whether any is live (0 while
# none has measured). Workers run in parallel, so their rates add up: 1 / sum(1 / s_w).
SPEED_FUNCTIONS = """
local function live_seconds_per_image(workers, speeds, now)
  local live = redis.call('ZRANGEBYSCORE', workers, now, '+inf')
  if #live == 0 then
    return 0, false
  end
  local rate = 0
  for _, seconds in ipairs(redis.call('HMGET', speeds, unpack(live))) do
    local s = tonumber(seconds)
    if s and s > 0 then
      rate = rate + 1 / s
    end
  end
  if rate > 0 then
    return 1 / rate, true
  end
  return 0, true
end
"""

# KEYS: the model's workers, its speeds. ARGV: now. The seconds per image as text (a Lua number
# would reach Python as an integer).
SECONDS_PER_IMAGE = (
    SPEED_FUNCTIONS
    + """
local per_image = live_seconds_per_image(KEYS[1], KEYS[2], tonumber(ARGV[1]))
return string.format('%.17g', per_image)
"""
)


@dataclass(frozen=True)
class RegistryKeys:
    prefix: str

    def workers(self, model_id: str) -> str:
        """Sorted set of worker names serving a model, scored by heartbeat expiry time."""
        return f"{self.prefix}workers:{model_slug(model_id)}"

    def speeds(self, model_id: str) -> str:
        """Hash: worker name -> seconds per image that worker measured for the model."""
        return f"{self.prefix}speed:{model_slug(model_id)}"

    def model_info(self) -> str:
        """Hash: model id -> ModelInfo JSON."""
        return f"{self.prefix}model-info"


class WorkerRegistry:
    """The worker's side (synchronous client): announce, withdraw, and the probe's look-up."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self._keys = RegistryKeys(prefix)
        self._beat = redis.register_script(BEAT)

    def beat(self, worker_name: str, models: list[ModelInfo], ttl_s: float, seconds_per_image: dict[str, float]) -> None:
        """Announce ``worker_name`` as serving ``models`` for ``ttl_s`` from now, with its speeds, and
        drop the workers whose announcement has lapsed."""
        now = time.time()
        keys = [self._keys.model_info()]
        args: list[str | float] = [worker_name, now, now + ttl_s]
        for info in models:
            keys += [self._keys.workers(info.id), self._keys.speeds(info.id)]
            args += [info.id, info.model_dump_json(), seconds_per_image.get(info.id, "")]
        self._beat(keys=keys, args=args)

    def withdraw(self, worker_name: str, model_ids: list[str]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for model_id in model_ids:
            pipe.zrem(self._keys.workers(model_id), worker_name)
        pipe.execute()

    def live_workers(self, model_id: str, now: float) -> list[str]:
        """Names of the workers whose announcement of the model has not lapsed at ``now``."""
        return [member.decode() for member in self._redis.zrangebyscore(self._keys.workers(model_id), now, "+inf")]


class ModelRegistry:
    """The API's side (asyncio client): who serves a model now, how fast, and what it looks like."""

    def __init__(self, redis: redis.asyncio.Redis, prefix: str) -> None:
        self._redis = redis
        self._keys = RegistryKeys(prefix)
        self._seconds_per_image = redis.register_script(SECONDS_PER_IMAGE)

    async def live_workers(self, model_id: str) -> int:
        return int(await self._redis.zcount(self._keys.workers(model_id), time.time(), "+inf"))

    def count_live_workers(self, pipe: AsyncPipeline, model_id: str, now: float) -> None:
        """Queue the count of the model's live workers on ``pipe`` (for a caller's single round trip)."""
        pipe.zcount(self._keys.workers(model_id), now, "+inf")

    async def seconds_per_image(self, model_id: str) -> float:
        """How long the model's live workers together take per image; 0 while none has measured."""
        return float(await self._seconds_per_image(keys=[self._keys.workers(model_id), self._keys.speeds(model_id)], args=[time.time()]))

    async def model_info(self, model_id: str) -> ModelInfo | None:
        """What a worker reported about the model; None until one has announced it."""
        raw = await self._redis.hget(self._keys.model_info(), model_id)
        return ModelInfo.model_validate_json(raw) if raw is not None else None

    async def model_infos(self) -> dict[str, ModelInfo]:
        raw = await self._redis.hgetall(self._keys.model_info())
        return {key.decode(): ModelInfo.model_validate_json(value) for key, value in raw.items()}
