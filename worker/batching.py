"""Coalesce images from concurrent requests into model batches, on one thread per model.

A task thread announces an image with ``expect()`` when it starts decoding it, then hands over the
preprocessed image with ``submit()`` (or withdraws it with ``withdraw()`` if it cannot be decoded)
and gets a future back. Images whose request was withdrawn are dropped when a batch is formed
(``worker.tickets``): their futures fail with ``Withdrawn`` and the model never sees them. The batch thread takes whatever is waiting as soon as the model is free (up
to ``max_batch_size``). It waits for more, up to ``max_wait_s``, only while announced images are
still being decoded: a lone request never waits, and a busy model runs fuller batches. Images of
interactive requests go before those of bulk jobs, so a running backfill does not hold up
``/v1/embeddings``. The forward pass itself runs on the worker's one compute thread
(``worker.model.compute``), shared by its models.
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

import torch

from worker.model.loader import LoadedModel
from worker.tickets import Ticket, WithdrawalCheck, Withdrawn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Embedding:
    cls: torch.Tensor
    mean: torch.Tensor


@dataclass(order=True)
class _Pending:
    priority: int
    sequence: int  # FIFO within a priority
    pixel_values: torch.Tensor = field(compare=False)
    future: Future[Embedding] = field(compare=False)
    on_done: Callable[[], None] | None = field(compare=False)
    ticket: Ticket | None = field(compare=False)


BatchObserver = Callable[[int, float], None]

INTERACTIVE, BULK = 0, 1


class BatchRunner:
    def __init__(
        self, model: LoadedModel, compute: Executor, max_batch_size: int, max_wait_s: float, observe: BatchObserver | None = None, check_withdrawn: WithdrawalCheck | None = None
    ) -> None:
        self._model = model
        self._check_withdrawn = check_withdrawn
        self._compute = compute
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._observe = observe
        # One condition guards the waiting images and the count of announced ones, so the batch
        # thread wakes for either change: a new image, or an announced one that will not come.
        self._changed = threading.Condition()
        self._waiting: list[_Pending] = []
        self._expected = 0
        self._stopping = False
        self._sequence = itertools.count()
        self._thread = threading.Thread(target=self._run, name=f"batch:{model.info.model_type}", daemon=True)
        self._thread.start()

    def expect(self) -> None:
        """An image is being decoded for this model: worth waiting for, briefly."""
        with self._changed:
            self._expected += 1

    def withdraw(self) -> None:
        """An announced image will not come (it could not be decoded)."""
        with self._changed:
            self._expected -= 1
            self._changed.notify()

    def submit(
        self, pixel_values: torch.Tensor, on_done: Callable[[], None] | None = None, priority: int = INTERACTIVE, announced: bool = False, ticket: Ticket | None = None
    ) -> Future[Embedding]:
        """Queue one ``(3, H, W)`` image (``announced``: by ``expect()``); ``on_done`` runs once the
        image has left the model, computed or dropped."""
        future: Future[Embedding] = Future()
        with self._changed:
            heapq.heappush(self._waiting, _Pending(priority, next(self._sequence), pixel_values, future, on_done, ticket))
            if announced:
                self._expected -= 1
            self._changed.notify()
        return future

    def stop(self) -> None:
        """Finish what is queued, then end the thread."""
        with self._changed:
            self._stopping = True
            self._changed.notify()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                return
            batch = self._drop_withdrawn(batch)
            if batch:
                self._compute.submit(self._forward, batch).result()

    def _next_batch(self) -> list[_Pending]:
        """Up to ``max_batch_size`` images, best first; empty once stopping and nothing is left."""
        with self._changed:
            while not self._waiting:
                if self._stopping:
                    return []
                self._changed.wait()
            batch = [heapq.heappop(self._waiting)]
            deadline = time.monotonic() + self._max_wait_s
            while len(batch) < self._max_batch_size:
                if self._waiting:
                    batch.append(heapq.heappop(self._waiting))
                    continue
                remaining = deadline - time.monotonic()
                if self._expected <= 0 or remaining <= 0 or self._stopping:
                    break
                self._changed.wait(remaining)
            return batch

    def _drop_withdrawn(self, batch: list[_Pending]) -> list[_Pending]:
        tickets = {id(p.ticket): p.ticket for p in batch if p.ticket is not None and p.ticket.reply_key is not None and not p.ticket.withdrawn}
        if tickets and self._check_withdrawn is not None:
            try:
                self._check_withdrawn(list(tickets.values()))
            except Exception as exc:  # Redis unreachable: compute rather than guess the client left
                log.warning("could not check for withdrawn requests", extra={"model": self._model.model_id, "error": type(exc).__name__})
        kept = []
        for pending in batch:
            if pending.ticket is None or pending.ticket.wanted():
                kept.append(pending)
            else:
                _release(pending)
                pending.future.set_exception(Withdrawn())
        return kept

    def _forward(self, batch: list[_Pending]) -> None:
        # Processors with a fixed output size give one group; others are batched per shape.
        groups: dict[tuple[int, ...], list[_Pending]] = defaultdict(list)
        for pending in batch:
            groups[tuple(pending.pixel_values.shape)].append(pending)
        for group in groups.values():
            started = time.perf_counter()
            try:
                cls, mean = self._model.embedder.embed(torch.stack([p.pixel_values for p in group]))
            except Exception as exc:  # a failed forward must fail its requests, not the thread
                log.exception("forward pass failed", extra={"model": self._model.model_id, "batch_size": len(group)})
                for pending in group:
                    _release(pending)
                    pending.future.set_exception(exc)
                continue
            if self._observe is not None:
                self._observe(len(group), time.perf_counter() - started)
            for row, pending in enumerate(group):
                _release(pending)
                pending.future.set_result(Embedding(cls[row], mean[row]))


def _release(pending: _Pending) -> None:
    if pending.on_done is not None:
        pending.on_done()
