"""Admission by bytes: refuse work whose images would take Redis past its memory budget.

Redis holds every image the API accepts until a worker embeds it, and a job's results until they
expire. A Redis at ``maxmemory`` with ``noeviction`` refuses writes, so work must be refused before
that, with a clear answer, rather than half stored. Before storing a request's or a job's images the
API reads Redis's ``used_memory`` (``INFO memory``) and answers 507 ``redis_full`` when that, plus what
this API process is storing right now, plus the new work's images and an estimate of its results,
exceeds the budget:

- ``IMBEDDINGS_REDIS_MAX_BYTES`` when set;
- otherwise 80% of Redis's ``maxmemory``: the rest is headroom for the queues, results of work already
  admitted and the other API instances' submissions in flight;
- otherwise (Redis without ``maxmemory``) half of the memory of the host Redis runs on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import redis.asyncio

from api.errors import ApiError
from api.inputs import ParsedInput
from shared.errors import ErrorCode
from shared.store.registry import ModelRegistry

MAXMEMORY_SHARE = 0.8
HOST_MEMORY_SHARE = 0.5
# A model's vector length before any worker has reported it: long enough for the largest supported
# families (ViT-L and DINOv2-L are 1024; giant models report theirs once loaded).
UNKNOWN_DIM = 1024
RETRY_AFTER_S = 10


def result_bytes(dim: int) -> int:
    """Redis memory one stored result takes: two base64 float32 vectors, JSON and hash overhead."""
    return 2 * (4 * dim * 4 // 3) + 160


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class Budget:
    limit: int | None
    source: str


class MemoryBudget:
    def __init__(self, redis: redis.asyncio.Redis, registry: ModelRegistry, configured_bytes: int | None) -> None:
        self._redis = redis
        self._registry = registry
        self._configured = configured_bytes
        # Bytes this process is storing right now, not yet in used_memory: concurrent submissions
        # must not each see the same room.
        self._in_flight = 0

    def _budget(self, info: dict[str, object]) -> Budget:
        if self._configured is not None:
            return Budget(self._configured, "IMBEDDINGS_REDIS_MAX_BYTES")
        maxmemory = int(str(info.get("maxmemory", 0)))
        if maxmemory > 0:
            return Budget(int(maxmemory * MAXMEMORY_SHARE), f"{MAXMEMORY_SHARE:.0%} of Redis's maxmemory of {_mb(maxmemory)}")
        host = int(str(info.get("total_system_memory", 0)))
        if host > 0:
            return Budget(int(host * HOST_MEMORY_SHARE), f"{HOST_MEMORY_SHARE:.0%} of the {_mb(host)} of the host Redis runs on (Redis has no maxmemory)")
        return Budget(None, "none")

    async def need(self, model: str, images: list[ParsedInput]) -> int:
        """What storing these images and, later, their results adds to Redis."""
        return sum(len(image.data) for image in images if image.data is not None) + await self.results_need(model, len(images))

    async def results_need(self, model: str, count: int) -> int:
        """What ``count`` results of ``model`` will add to Redis."""
        info = await self._registry.model_info(model)
        return count * result_bytes(info.dim if info is not None else UNKNOWN_DIM)

    @asynccontextmanager
    async def reserve(self, need: int, what: str) -> AsyncIterator[None]:
        """Hold ``need`` bytes while the work is stored; 507 when they do not fit in the budget."""
        info = await self._redis.info("memory")
        budget = self._budget(info)
        used = int(info["used_memory"])
        if budget.limit is not None and used + self._in_flight + need > budget.limit:
            raise ApiError(
                ErrorCode.REDIS_FULL,
                f"Redis has no room for this {what}: it holds {_mb(used + self._in_flight)} of its {_mb(budget.limit)} budget ({budget.source}), "
                f"and it needs about {_mb(need)} more "
                "(its images and results); retry once running work has finished, or send fewer or smaller images",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self._in_flight += need
        try:
            yield
        finally:
            self._in_flight -= need
