"""One served model's pipeline: images in, (CLS, MEAN) out, in the order they were given.

An image travels: sources (``worker.images.sources``) -> fetch (``worker.images.fetch_queue``) ->
decode (``worker.images.decode_pool``) -> preprocess (``worker.model.preprocess``) -> batch
(``worker.batching``) -> embed and pool (``worker.model.embedder``) -> the task stores the result
(``worker.tasks``). The pools it runs on are shared by the process's models (``worker.pools``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator
from concurrent.futures import CancelledError, Future
from contextlib import contextmanager
from dataclasses import replace

import torch

from shared.errors import ErrorCode
from shared.protocol import ItemError, ItemResult
from shared.settings import Settings
from shared.vectors import encode_f32
from worker import metrics
from worker.batching import BULK, INTERACTIVE, Admission, Batcher, Embedding, Reservation
from worker.errors import ImageInputError
from worker.images.decode import DecodeLimits
from worker.images.decode_pool import DecodeAbandoned
from worker.images.limits import InputLimits
from worker.images.sources import ImageInput
from worker.model.embedder import resolve_backend
from worker.model.loader import LoadedModel, load_model, probe_image
from worker.model.preprocess import Preprocessor, choose_preprocessor, resize_rule
from worker.pools import WorkerPools
from worker.speed import SpeedMeter
from worker.tickets import Ticket, WithdrawalCheck, Withdrawn

log = logging.getLogger(__name__)


class WorkerStopping(Exception):
    """The worker is shutting down: work not yet started goes back to the queue."""


class Submitted:
    """Images on their way through a pipeline (``ModelPipeline.submit``), by their input index."""

    def __init__(self, pipeline: ModelPipeline, indexes: list[int], queued: list[Future[Embedding] | ImageInputError]) -> None:
        self._pipeline = pipeline
        self._indexes = indexes
        self._queued = queued

    def futures(self) -> list[Future[Embedding]]:
        """The images handed to the model, to wait on (the others already have their error)."""
        return [entry for entry in self._queued if isinstance(entry, Future)]

    def done(self) -> bool:
        """Every image has its outcome: ``results()`` will not wait."""
        return all(future.done() for future in self.futures())

    def results(self) -> list[ItemResult]:
        """Each image's vector or error, in input order, once they have come."""
        return [self._pipeline.collect(index, entry) for index, entry in zip(self._indexes, self._queued)]


class ModelPipeline:
    def __init__(
        self,
        model: LoadedModel,
        preprocess: Preprocessor,
        decode_limits: DecodeLimits,
        pools: WorkerPools,
        settings: Settings,
        check_withdrawn: WithdrawalCheck | None,
        speeds: SpeedMeter,
    ) -> None:
        self.model = model
        self._speeds = speeds
        self._preprocess = preprocess
        self._decode_limits = decode_limits
        self._pools = pools
        # Job chunks take turns: enough at once to keep batches full, few enough that requests and
        # other chunks are not starved.
        self._chunk_turns = threading.BoundedSemaphore(settings.bulk_concurrency)
        self._admission = Admission(settings.max_batch_size)
        max_wait_s = settings.max_batch_wait_ms / 1000
        self._batcher = Batcher(self._admission, model.embedder, pools.compute, model.info, max_wait_s, self._observe_batch, check_withdrawn)

    @classmethod
    def load(
        cls,
        model_id: str,
        settings: Settings,
        pools: WorkerPools,
        limits: InputLimits,
        torch_threads: int,
        device: torch.device,
        dtype: torch.dtype,
        token: str | None,
        check_withdrawn: WithdrawalCheck | None,
        speeds: SpeedMeter,
    ) -> ModelPipeline:
        """Load, check and warm up a model on the compute thread, where it will run."""

        def on_compute_thread() -> ModelPipeline:
            backend = resolve_backend(settings.backend, device)
            model = load_model(
                model_id, device, dtype, token, settings.max_batch_size, backend, torch_threads, settings.openvino_cache_dir, settings.openvino_streams
            )
            metrics.MODEL_LOAD_SECONDS.labels(model.model_id).set(model.load_seconds)
            decode_limits = replace(limits.decode, resize=resize_rule(model.processor))
            if settings.jpeg_draft:
                decode_limits = decode_limits.with_jpeg_draft(model.info.image_size)
            preprocess = choose_preprocessor(model.processor, settings.preprocessing, probe_image())
            return cls(model, preprocess, decode_limits, pools, settings, check_withdrawn, speeds)

        return pools.compute.submit(on_compute_thread).result()

    def _observe_batch(self, images: int, seconds: float) -> None:
        metrics.observe_batch(self.model.model_id, images, seconds)
        self._speeds.observe(self.model.model_id, images, seconds)

    def submit(self, inputs: list[ImageInput], bulk: bool = False, ticket: Ticket | None = None) -> Submitted:
        """Start ``inputs`` on their way to the model; ``results()`` of what it returns has every
        image's vector or error, in input order. Nothing more is fetched, decoded or computed for them
        once ``ticket`` is withdrawn. A task can so have the images of several requests in the same batches."""
        ticket = ticket or Ticket()
        priority = BULK if bulk else INTERACTIVE
        # URLs are fetched in parallel on I/O threads (a fair share of them per request); decoding
        # waits for its bytes in input order.
        fetches = self._pools.fetches.fetch_all([item.url for item in inputs if item.url is not None], ticket.withdrawn_now)
        queued: list[Future[Embedding] | ImageInputError] = []
        for item in inputs:
            try:
                data = fetches.next_body() if item.url is not None else item.data
            except ImageInputError as exc:
                queued.append(exc)
                continue
            except Exception as exc:  # whatever the fetcher trips over is still this URL's failure, never its batch's
                queued.append(ImageInputError(ErrorCode.URL_FETCH_FAILED, f"URL fetch failed: {type(exc).__name__}: {exc}"))
                continue
            assert data is not None
            if not ticket.wanted():
                queued.append(Withdrawn())
                continue
            # Reserved before decoding starts, so the batcher waits for the image rather than run a
            # batch without it.
            reservation = self._admission.reserve(priority, ticket)
            self._pools.prep.submit(self._prepare, data, reservation).add_done_callback(lambda job, reservation=reservation: self._never_ran(job, reservation))
            queued.append(reservation.future)
        return Submitted(self, [item.index for item in inputs], queued)

    def _prepare(self, data: bytes, reservation: Reservation) -> None:
        ticket = reservation.ticket
        try:
            if ticket is not None and not ticket.wanted():
                raise Withdrawn()
            started = time.perf_counter()
            deadline = ticket.deadline if ticket is not None and math.isfinite(ticket.deadline) else None
            pixel_values = self._preprocess(self._pools.decode.decode(data, self._decode_limits, deadline))
            metrics.PREPROCESS_SECONDS.labels(self.model.model_id).observe(time.perf_counter() - started)
        except ImageInputError as exc:
            self._admission.cancel(reservation, exc)
        except DecodeAbandoned:
            self._admission.cancel(reservation, WorkerStopping())
        except Exception as exc:  # anything else a decoder or processor trips over is still the image's fault
            self._admission.cancel(reservation, ImageInputError(ErrorCode.INVALID_IMAGE, f"image could not be processed: {type(exc).__name__}: {exc}"))
        except BaseException as exc:  # the task waits on this reservation: it is answered whatever happens
            self._admission.cancel(reservation, exc)
            raise
        else:
            self._admission.submit(reservation, pixel_values)

    def _never_ran(self, job: Future[None], reservation: Reservation) -> None:
        if job.cancelled():  # the pools stopped before this image was decoded
            self._admission.cancel(reservation, CancelledError())

    def collect(self, index: int, queued: Future[Embedding] | ImageInputError) -> ItemResult:
        """One image's vector or error, once it has come (the metrics count it here)."""
        try:
            if isinstance(queued, ImageInputError):
                raise queued
            embedding = queued.result()
        except ImageInputError as exc:  # withdrawn work ends here too, from any stage
            metrics.IMAGES.labels(self.model.model_id, "withdrawn" if exc.code == Withdrawn.CODE else "rejected").inc()
            return ItemResult(index=index, error=exc.to_item_error())
        except WorkerStopping:
            raise
        except Exception as exc:  # the model failed, not the input: reported, never swallowed silently
            metrics.IMAGES.labels(self.model.model_id, "failed").inc()
            error = ItemError(message=f"inference failed: {type(exc).__name__}: {exc}", code=ErrorCode.INFERENCE_FAILED)
            return ItemResult(index=index, error=error)
        metrics.IMAGES.labels(self.model.model_id, "embedded").inc()
        return ItemResult(
            index=index, cls_b64=encode_f32(embedding.cls.numpy()), mean_b64=encode_f32(embedding.mean.numpy()), tokens=self.model.info.tokens_per_image
        )

    @contextmanager
    def chunk_turn(self, stopping: threading.Event) -> Iterator[None]:
        """A turn to embed a job chunk; raises WorkerStopping if ``stopping`` is set while waiting."""
        while not self._chunk_turns.acquire(timeout=0.25):
            if stopping.is_set():
                raise WorkerStopping
        try:
            if stopping.is_set():
                raise WorkerStopping
            yield
        finally:
            self._chunk_turns.release()

    def stop(self) -> None:
        self._batcher.stop()
