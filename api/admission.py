"""Admission of synchronous requests: refuse up front the work that could not finish, in one round trip.

One script (``shared.store.admission``) weighs a request, in this order, against: the model's live
workers (503 when none), the key's quota (``api.quotas``: 400 when the request alone exceeds it, 429
when the key's unfinished work leaves no room), Redis's memory budget (``api.memory_budget``: 507),
and the expected wait. The ledger of admitted requests lives in Redis so every API instance sees the
same queue; the expected wait of a new request is the images ahead of it (and its own) times the
seconds the model's workers need per image, which the workers measure and publish
(``shared.store.registry``). When that exceeds the request timeout, the answer is 429 with a
``Retry-After`` computed from the excess, rather than a request accepted only to end in 504; a
request that alone needs more than the timeout gets 400.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from redis.asyncio.client import Pipeline as AsyncPipeline

from api.errors import ApiError
from api.memory_budget import MemoryBudget
from api.quotas import TenantQuota
from shared.errors import ErrorCode
from shared.store.admission import AdmissionLimits, AdmissionStore, QueuedTask, RequestAsk, Verdict


@dataclass(frozen=True)
class Admission:
    """A request's place in the ledger and the key's quota; release it exactly when its wait ends."""

    key_id: str
    model: str
    work_id: str


class RequestAdmission:
    def __init__(self, store: AdmissionStore, quota: TenantQuota, memory: MemoryBudget, request_timeout_s: float, max_requests: int) -> None:
        self._store = store
        self._quota = quota
        self._memory = memory
        self._timeout_s = request_timeout_s
        self._max_requests = max_requests
        # How long what a request stores in Redis lives: past its deadline, so a worker still holding
        # it finds its bytes, and bounded, so what an API process that died left behind goes.
        self.ttl_s = math.ceil(request_timeout_s) + 60

    async def admit(self, model: str, asks: list[RequestAsk], task: QueuedTask | None) -> tuple[list[Admission | ApiError], bool]:
        """Weigh the requests in order, each after the ones before it: each one's admission (entered
        in its key's quota and the model's ledger until its deadline at the latest, its stored images
        stored), or the first refusal that applies to it; and whether ``task`` was queued with them,
        which it is when all were admitted."""
        budget = await self._memory.budget()
        limits = AdmissionLimits(
            key_limit=self._quota.limit,
            memory_budget=budget.limit,
            timeout_s=self._timeout_s,
            max_requests=self._max_requests,
            ttl_s=self.ttl_s,
        )
        verdicts, queued = await self._store.admit(model, limits, asks, task)
        outcomes: list[Admission | ApiError] = []
        for ask, verdict in zip(asks, verdicts, strict=True):
            if verdict.memory is not None:
                self._memory.seen(verdict.memory)
            if verdict.reason == "admitted":
                outcomes.append(Admission(ask.key_id, model, ask.work_id))
            elif verdict.reason == "redis_full":
                assert verdict.memory is not None
                outcomes.append(self._memory.refusal(verdict.memory.used + ask.bytes_in_flight, budget, ask.bytes_needed, "request"))
            else:
                outcomes.append(self._refusal(model, ask.images, verdict))
        return outcomes, queued

    async def admit_one(self, model: str, ask: RequestAsk, task: QueuedTask | None) -> Admission:
        """``admit`` for one request: its admission, or its refusal raised."""
        [outcome], _ = await self.admit(model, [ask], task)
        if isinstance(outcome, ApiError):
            raise outcome
        return outcome

    def _refusal(self, model: str, images: int, verdict: Verdict) -> ApiError:
        timeout = self._timeout_s
        per_image = verdict.seconds_per_image
        if verdict.reason == "not_served":
            message = f"no worker is serving model {model!r} right now; retry later"
            return ApiError(ErrorCode.MODEL_NOT_SERVED, message, param="model", headers={"Retry-After": "5"})
        if verdict.reason == "over_key_limit":
            return self._quota.over_limit(images)
        if verdict.reason == "key_quota":
            return self._quota.exceeded(images, verdict.queued, per_image)
        if verdict.reason == "exceeds_timeout":
            return ApiError(
                ErrorCode.REQUEST_EXCEEDS_TIMEOUT,
                f"{images} images need about {images * per_image:.0f} s of the model's time, more than the request timeout of {timeout:g} s; "
                "send fewer per request or submit a job (POST /v1/jobs)",
                param="input",
            )
        if verdict.reason == "depth":
            retry = _retry_after(per_image * images) if per_image > 0 else "2"
            return ApiError(
                ErrorCode.QUEUE_FULL,
                f"model {model!r} has {verdict.queued} requests waiting (limit {self._max_requests}); retry later",
                headers={"Retry-After": retry},
            )
        assert verdict.reason == "wait", verdict
        wait_s = verdict.wait_ms / 1000
        return ApiError(
            ErrorCode.QUEUE_FULL,
            f"model {model!r} is busy: this request would wait about {wait_s:.0f} s, longer than the request timeout of {timeout:g} s; retry later",
            headers={"Retry-After": _retry_after(wait_s - timeout)},
        )

    async def release(self, admission: Admission) -> None:
        """Leave the ledger and the key's quota (idempotent)."""
        await self._store.release(admission.key_id, admission.model, admission.work_id)

    def queue_take_reply(self, pipe: AsyncPipeline, admission: Admission, reply_key: str) -> None:
        """Queue on ``pipe``, behind the wait for the reply on ``reply_key``: take it and, when there is one, release."""
        self._store.queue_take_reply(pipe, reply_key, admission.key_id, admission.model, admission.work_id)

    async def take_reply(self, admission: Admission, reply_key: str) -> bytes | None:
        return await self._store.take_reply(reply_key, admission.key_id, admission.model, admission.work_id)


def _retry_after(excess_s: float) -> str:
    return str(max(1, math.ceil(excess_s)))
