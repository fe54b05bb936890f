"""Announce in Redis which models this worker serves, so the API can answer 503 instead of hanging."""

from __future__ import annotations

import logging
import threading
import time

from redis import Redis
from redis.exceptions import RedisError

from shared.keys import Keys
from shared.protocol import ModelInfo
from worker.speed import SpeedMeter

log = logging.getLogger(__name__)

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


class Heartbeat:
    def __init__(self, redis: Redis, keys: Keys, worker_name: str, models: list[ModelInfo], interval_s: float, ttl_s: float, speeds: SpeedMeter | None = None) -> None:
        self._redis = redis
        self._speeds = speeds or SpeedMeter()
        self._keys = keys
        self._name = worker_name
        self._models = models
        self._interval_s = interval_s
        self._ttl_s = ttl_s
        self._stopped = threading.Event()
        # A beat already on its way when the worker withdraws must not announce it again.
        self._beating = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._beat = redis.register_script(BEAT)

    def start(self) -> None:
        """Beats from now on, the first one at once; never raises, so nothing can stop announcing."""
        self._thread.start()

    def beat(self) -> None:
        now = time.time()
        keys = [self._keys.model_info()]
        args: list[str | float] = [self._name, now, now + self._ttl_s]
        speeds = self._speeds.snapshot()
        for info in self._models:
            keys += [self._keys.model_workers(info.id), self._keys.model_speed(info.id)]
            args += [info.id, info.model_dump_json(), speeds.get(info.id, "")]
        self._beat(keys=keys, args=args)

    def stop(self) -> None:
        """Withdraw at once: the API stops sending this worker's models work it would not finish."""
        self._stopped.set()
        with self._beating:
            self._withdraw()

    def _withdraw(self) -> None:
        try:
            pipe = self._redis.pipeline(transaction=False)
            for info in self._models:
                pipe.zrem(self._keys.model_workers(info.id), self._name)
            pipe.execute()
        except RedisError as exc:
            log.warning("could not withdraw heartbeat", extra={"error": str(exc)})

    def _run(self) -> None:
        # The first beat too is retried until Redis answers: a Redis that is away for a moment at
        # start-up must not leave a worker consuming tasks without being announced.
        while True:
            with self._beating:
                if self._stopped.is_set():
                    return
                try:
                    self.beat()
                except RedisError as exc:
                    log.warning("heartbeat failed", extra={"error": str(exc)})
                except Exception:  # a dead heartbeat thread would leave the worker unannounced for good
                    log.exception("heartbeat failed")
            if self._stopped.wait(self._interval_s):
                return
