"""Synchronous requests admitted together: one admission script and one Celery task for several.

Group commit, as databases do it for their log: the first small request for a model that finds no
admission of that model on its way to Redis starts one at the next turn of the event loop; requests
that arrive while one is on its way wait for it to come back and then go together. A lone client
waits for nothing more than before; under load the requests of a round share its round trip, its
task message and, in the worker, Celery's per-task work and the Redis round trips of starting and
answering them (``worker.tasks.answer_requests``). A round carries at most one batch of images
(``IMBEDDINGS_MAX_BATCH_SIZE``; a request of more goes alone), so the workers of a fleet still share
the load as they did, and at most ``ROUND_BYTES`` of image bytes. Each request is still admitted or refused on its own, in order
(``shared.store.admission``), and withdrawn, re-sent and answered on its own.

Left to arrivals alone, rounds keep the size of the bursts they started with: the requests of one
task are answered together, so their clients' next requests arrive together again. While this process
already has ``BUSY_BATCHES`` batches of a model's images admitted and unanswered, the workers have its
work queued, and a round that would only queue behind it waits to fill instead: until it holds a
batch, until those requests' answers bring the unanswered work below that mark, or ``ROUND_HOLD_S``
at the most (another API process's work, or a worker that stopped, may keep the workers busy longer).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from api.admission import Admission, RequestAdmission
from api.errors import ApiError
from api.publisher import TaskPublisher
from shared.errors import ErrorCode
from shared.queues import EMBED_REQUESTS_TASK
from shared.store.admission import QueuedTask, RequestAsk

# Image bytes one round stores, at most: a request grouped is at most ``sync_requests.INLINE_TASK_BYTES``.
ROUND_BYTES = 1024 * 1024
# Batches of a model's images admitted by this process and unanswered, from which a round waits to fill.
BUSY_BATCHES = 2
# The longest a round waits to fill: small beside a batch of a real model on any device, and the most
# a request can lose should the workers' queue drain faster than this process sees.
ROUND_HOLD_S = 0.05


@dataclass
class _Waiting:
    ask: RequestAsk
    payload: dict[str, Any]  # the request's EmbedPayload, as the task carries it
    withdraw: Callable[[Admission], Awaitable[None]]  # drops its bytes, flags it for the workers, releases it
    admitted: asyncio.Future[Admission]

    @property
    def image_bytes(self) -> int:
        return sum(len(data) for _, data in self.ask.stored_images)


@dataclass
class _Round:
    requests: list[_Waiting] = field(default_factory=list)
    images: int = 0
    image_bytes: int = 0

    def has_room(self, waiting: _Waiting, round_images: int) -> bool:
        return self.images + waiting.ask.images <= round_images and self.image_bytes + waiting.image_bytes <= ROUND_BYTES

    def full(self, round_images: int) -> bool:
        return self.images >= round_images or self.image_bytes >= ROUND_BYTES

    def add(self, waiting: _Waiting) -> None:
        self.requests.append(waiting)
        self.images += waiting.ask.images
        self.image_bytes += waiting.image_bytes


class RequestGroups:
    """The API process's rounds of admission, per model."""

    def __init__(self, admission: RequestAdmission, tasks: TaskPublisher, round_images: int) -> None:
        self._admission = admission
        self._tasks = tasks
        self._round_images = round_images
        self._open: dict[str, _Round] = {}  # by model: the requests that go in its next round
        self._in_flight: dict[str, int] = {}  # by model: its rounds on their way to Redis
        self._unanswered: dict[str, int] = {}  # by model: images admitted in rounds, their wait not over
        self._held: dict[str, asyncio.TimerHandle] = {}  # by model: the hold of its open round
        self._background: set[asyncio.Future[None]] = set()  # referenced until done, as asyncio requires

    async def admit(self, model: str, ask: RequestAsk, payload: dict[str, Any], withdraw: Callable[[Admission], Awaitable[None]]) -> Admission:
        """The request's admission, or its refusal raised, once its round has come back from Redis.
        Its caller reports ``settled`` when the admitted request's wait is over; a caller cancelled
        before the round came back (its client left) has what the round admitted withdrawn with
        ``withdraw`` instead, rather than computed for nobody."""
        waiting = _Waiting(ask, payload, withdraw, asyncio.get_running_loop().create_future())
        open_round = self._open.get(model)
        if open_round is not None and not open_round.has_room(waiting, self._round_images):
            self._send(model)
            open_round = None
        if open_round is None:
            open_round = self._open[model] = _Round()
            if not self._in_flight.get(model):
                asyncio.get_running_loop().call_soon(self._send_or_hold, model)
        open_round.add(waiting)
        if open_round.full(self._round_images):
            self._send(model)
        try:
            return await asyncio.shield(waiting.admitted)
        except asyncio.CancelledError:
            waiting.admitted.add_done_callback(partial(self._abandoned, model, waiting))
            raise

    def _abandoned(self, model: str, waiting: _Waiting, admitted: asyncio.Future[Admission]) -> None:
        if admitted.cancelled() or admitted.exception() is not None:
            return
        self.settled(model, waiting.ask.images)
        self._in_background(waiting.withdraw(admitted.result()))

    def _in_background(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def settled(self, model: str, images: int) -> None:
        """An admitted request's wait is over (answered or withdrawn)."""
        self._unanswered[model] -= images
        if model in self._held and not self._busy(model):
            self._send(model)

    def _busy(self, model: str) -> bool:
        return self._unanswered.get(model, 0) >= BUSY_BATCHES * self._round_images

    def _send_or_hold(self, model: str) -> None:
        if model not in self._open or model in self._held:
            return
        if self._busy(model):
            self._held[model] = asyncio.get_running_loop().call_later(ROUND_HOLD_S, self._send, model)
        else:
            self._send(model)

    def _send(self, model: str) -> None:
        if (hold := self._held.pop(model, None)) is not None:
            hold.cancel()
        sending = self._open.pop(model, None)
        if sending is None:  # already sent, by a request that filled it
            return
        self._in_flight[model] = self._in_flight.get(model, 0) + 1
        admitting = asyncio.ensure_future(self._admit(model, sending.requests))
        self._background.add(admitting)
        # A callback rather than a finally: it runs even for a round cancelled before it started.
        admitting.add_done_callback(partial(self._round_over, model, sending))

    def _round_over(self, model: str, sending: _Round, admitting: asyncio.Future[None]) -> None:
        self._background.discard(admitting)
        for waiting in sending.requests:  # the round was cancelled (the API stopping): no answer came
            if not waiting.admitted.done():
                waiting.admitted.set_exception(ApiError(ErrorCode.QUEUE_UNAVAILABLE, "the API stopped before the request was queued; retry"))
        self._in_flight[model] -= 1
        if not self._in_flight[model]:
            self._send_or_hold(model)

    async def _admit(self, model: str, requests: list[_Waiting]) -> None:
        asks = [waiting.ask for waiting in requests]
        try:
            outcomes, queued = await self._admission.admit(model, asks, QueuedTask(*self._task(model, requests)))
        except Exception as exc:  # Redis refused or went away: each request answers with what it raised
            # The script may have run with only its answer lost: what it admitted is withdrawn, not
            # computed for nobody (a withdrawal of a request it did not admit changes nothing).
            for waiting in requests:
                self._in_background(waiting.withdraw(Admission(waiting.ask.key_id, model, waiting.ask.work_id)))
                waiting.admitted.set_exception(exc)
            return
        admitted = [waiting for waiting, outcome in zip(requests, outcomes) if isinstance(outcome, Admission)]
        if admitted and not queued:
            # Some were refused, so the round's task was not queued: the admitted ones' goes now.
            try:
                await self._tasks.publish(EMBED_REQUESTS_TASK, [self._payload(model, admitted)])
            except Exception as exc:
                for waiting, outcome in zip(requests, outcomes):
                    if isinstance(outcome, Admission):
                        self._in_background(waiting.withdraw(outcome))
                outcomes = [exc if isinstance(outcome, Admission) else outcome for outcome in outcomes]
        for waiting, outcome in zip(requests, outcomes):
            if isinstance(outcome, Admission):
                self._unanswered[model] = self._unanswered.get(model, 0) + waiting.ask.images
                waiting.admitted.set_result(outcome)
            else:
                waiting.admitted.set_exception(outcome)

    def _task(self, model: str, requests: list[_Waiting]) -> tuple[str, bytes]:
        return self._tasks.message(EMBED_REQUESTS_TASK, self._payload(model, requests))

    @staticmethod
    def _payload(model: str, requests: list[_Waiting]) -> dict[str, Any]:
        return {"model": model, "requests": [waiting.payload for waiting in requests]}

