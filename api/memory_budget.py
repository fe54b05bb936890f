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

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import redis.asyncio

from api.errors import ApiError
from api.inputs import ParsedInput
from shared.errors import ErrorCode
from shared.store.admission import RedisMemory
from shared.store.registry import ModelRegistry

MAXMEMORY_SHARE = 0.8
HOST_MEMORY_SHARE = 0.5
# A model's vector length before any worker has reported it: long enough for the largest supported
# families (ViT-L and DINOv2-L are 1024; giant models report theirs once loaded).
UNKNOWN_DIM = 1024
# How long a model's vector length, once a worker reported it, is taken as known. It changes only
# when the model's workers are replaced by ones serving another model under the same id, and it only
# sizes the estimate of the results' bytes, so reading it again once a minute is soon enough.
DIM_CACHE_S = 60.0
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
    """The budget and this process's bytes in flight. A synchronous request is weighed inside its
    admission script (``api.admission``), with the budget from the ``INFO memory`` the previous
    admission read (maxmemory changes only with ``CONFIG SET`` or a restart; ``used_memory`` is read
    fresh every time); jobs and files are weighed by ``reserve``."""

    def __init__(self, redis: redis.asyncio.Redis, registry: ModelRegistry, configured_bytes: int | None) -> None:
        self._redis = redis
        self._registry = registry
        self._configured = configured_bytes
        # Bytes this process is storing right now, not yet in used_memory: concurrent submissions
        # must not each see the same room.
        self._in_flight = 0
        self._budget: Budget | None = None
        self._dims: dict[str, tuple[int, float]] = {}

    def _budget_of(self, memory: RedisMemory) -> Budget:
        if self._configured is not None:
            return Budget(self._configured, "IMBEDDINGS_REDIS_MAX_BYTES")
        if memory.maxmemory > 0:
            return Budget(int(memory.maxmemory * MAXMEMORY_SHARE), f"{MAXMEMORY_SHARE:.0%} of Redis's maxmemory of {_mb(memory.maxmemory)}")
        host = memory.total_system_memory
        if host > 0:
            return Budget(int(host * HOST_MEMORY_SHARE), f"{HOST_MEMORY_SHARE:.0%} of the {_mb(host)} of the host Redis runs on (Redis has no maxmemory)")
        return Budget(None, "none")

    async def _read(self) -> RedisMemory:
        info = await self._redis.info("memory")
        memory = RedisMemory(int(info["used_memory"]), int(str(info.get("maxmemory", 0))), int(str(info.get("total_system_memory", 0))))
        self.seen(memory)
        return memory

    def seen(self, memory: RedisMemory) -> None:
        """Keep the budget of what ``INFO memory`` just said."""
        self._budget = self._budget_of(memory)

    async def budget(self) -> Budget:
        """The budget as of the last ``INFO memory`` this process read (read now if it has none)."""
        if self._budget is None:
            await self._read()
        assert self._budget is not None
        return self._budget

    async def need(self, model: str, images: list[ParsedInput]) -> int:
        """What storing these images and, later, their results adds to Redis."""
        return sum(len(image.data) for image in images if image.data is not None) + await self.results_need(model, len(images))

    async def results_need(self, model: str, count: int) -> int:
        """What ``count`` results of ``model`` will add to Redis."""
        return count * result_bytes(await self._dim(model))

    async def _dim(self, model: str) -> int:
        known = self._dims.get(model)
        if known is not None and time.monotonic() - known[1] < DIM_CACHE_S:
            return known[0]
        info = await self._registry.model_info(model)
        if info is None:  # not cached: the first worker's report counts from the next request on
            return UNKNOWN_DIM
        self._dims[model] = (info.dim, time.monotonic())
        return info.dim

    def refusal(self, used: int, budget: Budget, need: int, what: str) -> ApiError:
        """507: Redis (holding ``used`` bytes) has no room in ``budget`` for ``need`` more."""
        assert budget.limit is not None
        return ApiError(
            ErrorCode.REDIS_FULL,
            f"Redis has no room for this {what}: it holds {_mb(used)} of its {_mb(budget.limit)} budget ({budget.source}), "
            f"and it needs about {_mb(need)} more "
            "(its images and results); retry once running work has finished, or send fewer or smaller images",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )

    @contextmanager
    def hold(self, need: int) -> Iterator[int]:
        """Count ``need`` bytes as being stored by this process; yields the bytes the process's
        other submissions are storing, for a check made elsewhere (the admission script)."""
        others = self._in_flight
        self._in_flight += need
        try:
            yield others
        finally:
            self._in_flight -= need

    @asynccontextmanager
    async def reserve(self, need: int, what: str) -> AsyncIterator[None]:
        """Hold ``need`` bytes while the work is stored; 507 when they do not fit in the budget."""
        memory = await self._read()
        budget = self._budget_of(memory)
        if budget.limit is not None and memory.used + self._in_flight + need > budget.limit:
            raise self.refusal(memory.used + self._in_flight, budget, need, what)
        with self.hold(need):
            yield
