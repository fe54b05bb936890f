"""What the API process holds for its lifetime, and the FastAPI dependency that hands it out."""

from __future__ import annotations

from dataclasses import dataclass, field

import redis.asyncio
from celery import Celery
from fastapi import Request

from api.admission import RequestAdmission
from api.memory_budget import MemoryBudget
from api.publisher import TaskPublisher
from api.quotas import TenantQuota
from api.request_groups import RequestGroups
from shared.settings import Settings
from shared.store.admission import AdmissionStore
from shared.store.claims import ClaimWatch
from shared.store.jobs import AsyncJobStore
from shared.store.registry import ModelRegistry
from shared.store.requests import RequestExchange
from shared.store.tenants import TenantLedger


@dataclass
class AppState:
    settings: Settings
    redis: redis.asyncio.Redis
    # Blocking waits for replies get their own connections, whose read timeout covers one slice
    # of a wait (``wait_slice_s``) rather than one ordinary command.
    waits: redis.asyncio.Redis
    wait_slice_s: float
    celery: Celery
    allowed_models: list[str]
    registry: ModelRegistry = field(init=False)
    requests: RequestExchange = field(init=False)
    claims: ClaimWatch = field(init=False)
    memory: MemoryBudget = field(init=False)
    quotas: TenantQuota = field(init=False)
    admission: RequestAdmission = field(init=False)
    jobs: AsyncJobStore = field(init=False)
    tasks: TaskPublisher = field(init=False)
    request_groups: RequestGroups = field(init=False)

    def __post_init__(self) -> None:
        prefix = self.settings.redis_key_prefix
        self.registry = ModelRegistry(self.redis, prefix)
        self.requests = RequestExchange(self.redis, self.waits, prefix)
        self.claims = ClaimWatch(self.redis, prefix)
        self.memory = MemoryBudget(self.redis, self.registry, self.settings.redis_max_bytes)
        self.quotas = TenantQuota(TenantLedger(self.redis, prefix), self.settings.key_max_queued_images, self.registry)
        self.admission = RequestAdmission(
            AdmissionStore(self.redis, prefix), self.quotas, self.memory, self.settings.request_timeout_s, self.settings.max_queue_depth
        )
        self.jobs = AsyncJobStore(self.redis, prefix, self.settings.job_result_ttl_s)
        self.tasks = TaskPublisher(self.celery, self.redis)
        self.request_groups = RequestGroups(self.admission, self.tasks, self.settings.max_batch_size)


def get_state(request: Request) -> AppState:
    return request.app.state.imbeddings
