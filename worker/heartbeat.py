"""Announce in Redis which models this worker serves, so the API can answer 503 instead of hanging.

This module keeps the beat's thread and timing; what a beat writes is ``shared.store.registry``'s.
"""

from __future__ import annotations

import logging
import threading

from redis import Redis
from redis.exceptions import RedisError

from shared.protocol import ModelInfo
from shared.store.registry import WorkerRegistry
from worker.speed import SpeedMeter

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(
        self, redis: Redis, prefix: str, worker_name: str, models: list[ModelInfo], interval_s: float, ttl_s: float, speeds: SpeedMeter | None = None
    ) -> None:
        self._registry = WorkerRegistry(redis, prefix)
        self._speeds = speeds or SpeedMeter()
        self._name = worker_name
        self._models = models
        self._interval_s = interval_s
        self._ttl_s = ttl_s
        self._stopped = threading.Event()
        # A beat already on its way when the worker withdraws must not announce it again.
        self._beating = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        """Beats from now on, the first one at once; never raises, so nothing can stop announcing."""
        self._thread.start()

    def beat(self) -> None:
        self._registry.beat(self._name, self._models, self._ttl_s, self._speeds.snapshot())

    def stop(self) -> None:
        """Withdraw at once: the API stops sending this worker's models work it would not finish."""
        self._stopped.set()
        with self._beating:
            self._withdraw()

    def _withdraw(self) -> None:
        try:
            self._registry.withdraw(self._name, [info.id for info in self._models])
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
