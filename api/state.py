"""What the API process holds for its lifetime, and the FastAPI dependency that hands it out."""

from __future__ import annotations

from dataclasses import dataclass, field

import redis.asyncio
from celery import Celery
from fastapi import Request
from redis.commands.core import AsyncScript

from api.admission import AdmissionLedger
from api.memory_budget import MemoryBudget
from api.publisher import TaskPublisher
from api.quotas import TenantQuota
from shared.keys import Keys
from shared.settings import Settings
from shared.store.claims import ClaimWatch
from shared.store.jobs import CANCEL, CREATE, DISCARD, STORE_RESULTS
from shared.store.registry import ModelRegistry
from shared.store.requests import RequestExchange


@dataclass
class AppState:
    settings: Settings
    redis: redis.asyncio.Redis
    # Blocking waits for replies get their own connections, whose read timeout covers one slice
    # of a wait (``wait_slice_s``) rather than one ordinary command.
    waits: redis.asyncio.Redis
    wait_slice_s: float
    celery: Celery
    keys: Keys
    allowed_models: list[str]
    create_job_script: AsyncScript = field(init=False)
    store_results_script: AsyncScript = field(init=False)
    cancel_script: AsyncScript = field(init=False)
    discard_script: AsyncScript = field(init=False)
    registry: ModelRegistry = field(init=False)
    requests: RequestExchange = field(init=False)
    claims: ClaimWatch = field(init=False)
    ledger: AdmissionLedger = field(init=False)
    memory: MemoryBudget = field(init=False)
    quotas: TenantQuota = field(init=False)
    tasks: TaskPublisher = field(init=False)

    def __post_init__(self) -> None:
        self.create_job_script = self.redis.register_script(CREATE)
        self.store_results_script = self.redis.register_script(STORE_RESULTS)
        self.cancel_script = self.redis.register_script(CANCEL)
        self.discard_script = self.redis.register_script(DISCARD)
        prefix = self.settings.redis_key_prefix
        self.registry = ModelRegistry(self.redis, prefix)
        self.requests = RequestExchange(self.redis, self.waits, prefix)
        self.claims = ClaimWatch(self.redis, prefix)
        self.memory = MemoryBudget(self.redis, self.registry, self.settings.redis_max_bytes)
        self.ledger = AdmissionLedger(self.redis, prefix, self.registry, self.settings.request_timeout_s, self.settings.max_queue_depth)
        self.quotas = TenantQuota(self.redis, self.keys, self.settings.key_max_queued_images, self.ledger)
        self.tasks = TaskPublisher(self.celery, self.redis)


def get_state(request: Request) -> AppState:
    return request.app.state.imbeddings
