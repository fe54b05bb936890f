"""Coalesce images from concurrent requests into model batches, on one thread per model.

This module schedules and never runs a model itself (it does not import torch): each batch it forms
goes to the model's ``VisionEmbedder.embed`` (``worker.model.embedder``) on the worker's one compute
thread (``worker.model.compute``), shared by its models.

An image on its way to the model is tracked by one ``Admission``. A task thread ``reserve()``s a
slot for it before decoding starts, then either ``submit()``s the preprocessed pixels and gets a
future back, or ``cancel()``s the reservation when the image cannot be decoded. Slots are bounded
per priority, so a burst cannot grow memory, and a slot is freed once its image has left the model,
computed or dropped. Images whose request was withdrawn are dropped when a batch is formed
(``worker.tickets``): their futures fail with ``Withdrawn`` and the model never sees them.

The batch thread takes whatever is waiting as soon as the model is free (up to ``max_batch_size``).
It waits for more, up to ``max_wait_s``, only while reserved images are still being decoded: a lone
request never waits, and a busy model runs fuller batches. Images of interactive requests go before
those of bulk jobs, so a running backfill does not hold up ``/v1/embeddings``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shared.protocol import ModelInfo
from worker.tickets import Ticket, WithdrawalCheck, Withdrawn

if TYPE_CHECKING:
    from torch import Tensor

    from worker.model.embedder import VisionEmbedder

log = logging.getLogger(__name__)

INTERACTIVE, BULK = 0, 1

BatchObserver = Callable[[int, float], None]


@dataclass(frozen=True)
class Embedding:
    cls: Tensor
    mean: Tensor


@dataclass(frozen=True, eq=False)
class Reservation:
    """A slot held for one image, from the start of its decoding until it has left the model; its
    future is answered once, with the embedding or with why the image did not get one."""

    priority: int
    ticket: Ticket | None
    future: Future[Embedding] = field(default_factory=Future)


@dataclass(order=True)
class _Queued:
    priority: int
    sequence: int  # FIFO within a priority
    pixels: Tensor = field(compare=False)
    reservation: Reservation = field(compare=False)


class Admission:
    """The one owner of the images on their way to a model: the slots, the reserved count, the queue."""

    def __init__(self, max_batch_size: int) -> None:
        self.max_batch_size = max_batch_size
        # Job images get a smaller share (one batch on the model, one ready), taken before decoding
        # is queued: a request's image then waits behind at most that much job work, never behind a
        # whole backlog of job decodes.
        self._slots = {INTERACTIVE: threading.BoundedSemaphore(4 * max_batch_size), BULK: threading.BoundedSemaphore(2 * max_batch_size)}
        # One condition guards the queue and the count of reserved images, so the batch thread wakes
        # for either change: a new image, or a reserved one that will not come.
        self._changed = threading.Condition()
        self._waiting: list[_Queued] = []
        self._reserved = 0
        self._closed = False
        self._sequence = itertools.count()

    def reserve(self, priority: int = INTERACTIVE, ticket: Ticket | None = None) -> Reservation:
        """A slot for an image about to be decoded, waiting for one while its priority's share is full.
        Once reserved, the image is worth waiting for, briefly, when a batch is formed."""
        self._slots[priority].acquire()
        with self._changed:
            self._reserved += 1
        return Reservation(priority, ticket)

    def submit(self, reservation: Reservation, pixels: Tensor) -> Future[Embedding]:
        """Queue the reserved image's ``(3, H, W)`` pixels for the model; returns the reservation's future."""
        with self._changed:
            heapq.heappush(self._waiting, _Queued(reservation.priority, next(self._sequence), pixels, reservation))
            self._reserved -= 1
            self._changed.notify()
        return reservation.future

    def cancel(self, reservation: Reservation, reason: BaseException) -> None:
        """The reserved image will not come (it could not be decoded, or its request was withdrawn):
        its future fails with ``reason``."""
        with self._changed:
            self._reserved -= 1
            self._changed.notify()
        self._slots[reservation.priority].release()
        reservation.future.set_exception(reason)

    def close(self) -> None:
        """No more batches once the queue is empty."""
        with self._changed:
            self._closed = True
            self._changed.notify()

    def next_batch(self, max_wait_s: float) -> list[_Queued]:
        """Up to ``max_batch_size`` images, best first; empty once closed and nothing is left."""
        with self._changed:
            while not self._waiting:
                if self._closed:
                    return []
                self._changed.wait()
            batch = [heapq.heappop(self._waiting)]
            deadline = time.monotonic() + max_wait_s
            while len(batch) < self.max_batch_size:
                if self._waiting:
                    batch.append(heapq.heappop(self._waiting))
                    continue
                remaining = deadline - time.monotonic()
                if self._reserved <= 0 or remaining <= 0 or self._closed:
                    break
                self._changed.wait(remaining)
            return batch

    def finish(self, queued: _Queued, result: Embedding | BaseException) -> None:
        """The image has left the model: its slot is free, its future answered."""
        self._slots[queued.reservation.priority].release()
        if isinstance(result, BaseException):
            queued.reservation.future.set_exception(result)
        else:
            queued.reservation.future.set_result(result)


class Batcher:
    """The batch thread of one model: batches from its ``Admission``, forward passes on ``compute``."""

    def __init__(
        self,
        admission: Admission,
        embedder: VisionEmbedder,
        compute: Executor,
        model: ModelInfo,
        max_wait_s: float,
        observe: BatchObserver | None = None,
        check_withdrawn: WithdrawalCheck | None = None,
    ) -> None:
        self._admission = admission
        self._embedder = embedder
        self._compute = compute
        self._model_id = model.id
        self._max_wait_s = max_wait_s
        self._observe = observe
        self._check_withdrawn = check_withdrawn
        self._thread = threading.Thread(target=self._run, name=f"batch:{model.model_type}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish what is queued, then end the thread."""
        self._admission.close()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while True:
            batch = self._admission.next_batch(self._max_wait_s)
            if not batch:
                return
            batch = self._drop_withdrawn(batch)
            if batch:
                self._compute.submit(self._embed, batch).result()

    def _drop_withdrawn(self, batch: list[_Queued]) -> list[_Queued]:
        tickets = {id(t): t for q in batch if (t := q.reservation.ticket) is not None and t.reply_key is not None and not t.withdrawn}
        if tickets and self._check_withdrawn is not None:
            try:
                self._check_withdrawn(list(tickets.values()))
            except Exception as exc:  # Redis unreachable: compute rather than guess the client left
                log.warning("could not check for withdrawn requests", extra={"model": self._model_id, "error": type(exc).__name__})
        kept = []
        for queued in batch:
            ticket = queued.reservation.ticket
            if ticket is None or ticket.wanted():
                kept.append(queued)
            else:
                self._admission.finish(queued, Withdrawn())
        return kept

    def _embed(self, batch: list[_Queued]) -> None:
        # Processors with a fixed output size give one group; others are batched per shape.
        groups: dict[tuple[int, ...], list[_Queued]] = defaultdict(list)
        for queued in batch:
            groups[tuple(queued.pixels.shape)].append(queued)
        for group in groups.values():
            started = time.perf_counter()
            try:
                cls, mean = self._embedder.embed([queued.pixels for queued in group])
            except Exception as exc:  # a failed forward must fail its requests, not the thread
                log.exception("forward pass failed", extra={"model": self._model_id, "batch_size": len(group)})
                for queued in group:
                    self._admission.finish(queued, exc)
                continue
            if self._observe is not None:
                self._observe(len(group), time.perf_counter() - started)
            for row, queued in enumerate(group):
                self._admission.finish(queued, Embedding(cls[row], mean[row]))
