"""Admission of synchronous requests: refuse up front the work that would only time out.

The ledger lives in Redis so every API instance sees the same queue (``shared.store.admission``).

The expected wait of a new request is the images ahead of it (and its own) times the seconds the
model's workers need per image, which the workers measure and publish (``shared.store.registry``).
When that exceeds the request timeout, the answer is 429 with a ``Retry-After`` computed from the
excess, rather than a request accepted only to end in 504.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import redis.asyncio

from api.errors import ApiError
from shared.errors import ErrorCode
from shared.store.admission import AdmissionStore
from shared.store.registry import ModelRegistry


@dataclass(frozen=True)
class Admission:
    """A request's place in the ledger; release it exactly when its wait ends."""

    model: str
    work_id: str


class AdmissionLedger:
    def __init__(self, redis: redis.asyncio.Redis, prefix: str, registry: ModelRegistry, request_timeout_s: float, max_requests: int) -> None:
        self._store = AdmissionStore(redis, prefix)
        self._registry = registry
        self._timeout_s = request_timeout_s
        self._max_requests = max_requests

    async def seconds_per_image(self, model: str) -> float:
        """How long the model's live workers together take per image; 0 while none has measured.

        Workers run in parallel, so their rates add up: 1 / sum(1 / s_w).
        """
        rate = sum(1.0 / seconds for seconds in await self._registry.live_speeds(model))
        return 1.0 / rate if rate > 0 else 0.0

    async def admit(self, model: str, work_id: str, images: int, deadline: float) -> Admission:
        timeout = self._timeout_s
        per_image = await self.seconds_per_image(model)
        if per_image > 0 and images * per_image > timeout:
            raise ApiError(
                ErrorCode.REQUEST_EXCEEDS_TIMEOUT,
                f"{images} images need about {images * per_image:.0f} s of the model's time, more than the request timeout of {timeout:g} s; "
                "send fewer per request or submit a job (POST /v1/jobs)",
                param="input",
            )
        refusal = await self._store.admit(model, work_id, images, deadline, per_image, timeout, self._max_requests)
        if refusal is None:
            return Admission(model, work_id)
        if refusal.reason == "depth":
            retry = _retry_after(per_image * images) if per_image > 0 else "2"
            raise ApiError(
                ErrorCode.QUEUE_FULL,
                f"model {model!r} has {refusal.value} requests waiting (limit {self._max_requests}); retry later",
                headers={"Retry-After": retry},
            )
        wait_s = refusal.value / 1000
        raise ApiError(
            ErrorCode.QUEUE_FULL,
            f"model {model!r} is busy: this request would wait about {wait_s:.0f} s, longer than the request timeout of {timeout:g} s; retry later",
            headers={"Retry-After": _retry_after(wait_s - timeout)},
        )

    async def release(self, admission: Admission) -> None:
        await self._store.release(admission.model, admission.work_id)


def _retry_after(excess_s: float) -> str:
    return str(max(1, math.ceil(excess_s)))
