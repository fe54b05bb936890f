"""Coalesce images from concurrent requests into model batches, on one thread per model.

Task threads submit one preprocessed image at a time and get a future back. The batch thread takes
whatever is waiting as soon as the model is free (up to ``max_batch_size``). It waits for more, up
to ``max_wait_s``, only while ``incoming()`` says images are being decoded for this model right now:
a lone request never waits, and a busy model runs fuller batches. Images of interactive requests go
before those of bulk jobs, so a running backfill does not hold up ``/v1/embeddings``.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from worker.model_loader import LoadedModel
from worker.pooling import pool_cls_mean

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Embedding:
    cls: torch.Tensor
    mean: torch.Tensor


@dataclass
class _Pending:
    pixel_values: torch.Tensor
    future: Future[Embedding]
    on_done: Callable[[], None] | None


BatchObserver = Callable[[int, float], None]

INTERACTIVE, BULK, _STOP = 0, 1, 2


class BatchRunner:
    def __init__(self, model: LoadedModel, max_batch_size: int, max_wait_s: float, observe: BatchObserver | None = None, incoming: Callable[[], int] = lambda: 0) -> None:
        self._model = model
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._observe = observe
        self._incoming = incoming
        self._queue: queue.PriorityQueue[tuple[int, int, _Pending | None]] = queue.PriorityQueue()
        self._sequence = itertools.count()  # FIFO within a priority
        self._thread = threading.Thread(target=self._run, name=f"batch:{model.info.model_type}", daemon=True)
        self._thread.start()

    def submit(self, pixel_values: torch.Tensor, on_done: Callable[[], None] | None = None, priority: int = INTERACTIVE) -> Future[Embedding]:
        """Queue one ``(3, H, W)`` image; ``on_done`` runs once the image has left the model."""
        future: Future[Embedding] = Future()
        self._queue.put((priority, next(self._sequence), _Pending(pixel_values, future, on_done)))
        return future

    def stop(self) -> None:
        """Finish what is queued, then end the thread."""
        self._queue.put((_STOP, next(self._sequence), None))
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while True:
            first = self._queue.get()[2]
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self._max_wait_s
            stopping = False
            while len(batch) < self._max_batch_size:
                remaining = deadline - time.monotonic()
                try:
                    item = (self._queue.get(timeout=remaining) if remaining > 0 and self._incoming() > 0 else self._queue.get_nowait())[2]
                except queue.Empty:
                    if remaining > 0 and self._incoming() > 0:
                        continue
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            self._forward(batch)
            if stopping:
                return

    def _forward(self, batch: list[_Pending]) -> None:
        # Processors with a fixed output size give one group; others are batched per shape.
        groups: dict[tuple[int, ...], list[_Pending]] = defaultdict(list)
        for pending in batch:
            groups[tuple(pending.pixel_values.shape)].append(pending)
        for group in groups.values():
            started = time.perf_counter()
            try:
                pixels = torch.stack([p.pixel_values for p in group]).to(self._model.device, self._model.dtype, non_blocking=True)
                with torch.inference_mode():
                    hidden = self._model.module(pixel_values=pixels).last_hidden_state
                    cls, mean = pool_cls_mean(hidden, self._model.num_register_tokens)
                cls, mean = cls.cpu(), mean.cpu()
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
