"""What a running worker holds: its loaded models, their batch threads, and the thread pools that
fetch, decode and preprocess images while the model computes."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from shared.errors import ErrorCode
from shared.protocol import ItemError, ItemResult
from shared.settings import Settings
from shared.vectors import encode_f32
from worker import metrics
from worker.batching import BULK, INTERACTIVE, BatchRunner, Embedding
from worker.cpu_budget import ThreadBudget
from worker.errors import ImageInputError
from worker.images.connections import ConnectionPool
from worker.images.decode import DecodeLimits
from worker.images.decode_pool import DecodeAbandoned, DecodePool
from worker.images.fetch import Fetcher, FetchLimits
from worker.images.fetch_queue import FetchQueue
from worker.images.sources import ImageInput
from worker.images.structure import StructureLimits
from worker.model.compute import compute_executor, use_one_torch_thread
from worker.model.embedder import resolve_backend
from worker.model.loader import LoadedModel, load_model, probe_image
from worker.model.preprocess import Preprocessor, choose_preprocessor, resize_rule
from worker.speed import SpeedMeter
from worker.tickets import Ticket, WithdrawalCheck, Withdrawn


@dataclass(frozen=True)
class InputLimits:
    fetch: FetchLimits
    decode: DecodeLimits

    @classmethod
    def from_settings(cls, settings: Settings) -> InputLimits:
        return cls(
            fetch=FetchLimits.from_strings(settings.url_fetch_timeout_s, settings.url_max_redirects, settings.max_image_bytes, settings.url_allowed_networks),
            decode=DecodeLimits(
                settings.max_image_bytes,
                settings.max_image_pixels,
                settings.max_image_side,
                structure=StructureLimits(settings.max_image_segments, settings.max_metadata_bytes, settings.jpeg_max_scans),
                max_decoded_bytes=settings.decode_max_bytes,
            ),
        )


class ModelRuntime:
    """One served model: images in, (CLS, MEAN) out, in the order they were given."""

    def __init__(
        self,
        model: LoadedModel,
        preprocess: Preprocessor,
        limits: InputLimits,
        fetches: FetchQueue,
        prep_pool: ThreadPoolExecutor,
        decode_pool: DecodePool,
        compute: ThreadPoolExecutor,
        max_batch_size: int,
        max_batch_wait_s: float,
        bulk_concurrency: int,
        check_withdrawn: WithdrawalCheck | None,
        speeds: SpeedMeter,
    ) -> None:
        self.model = model
        self._speeds = speeds
        # Job chunks take turns: enough at once to keep batches full, few enough that requests and
        # other chunks are not starved.
        self.bulk_slots = threading.BoundedSemaphore(bulk_concurrency)
        self._preprocess = preprocess
        self._limits = limits
        self._fetches = fetches
        self._prep_pool = prep_pool
        self._decode_pool = decode_pool
        # Images taken into the pipeline (being decoded, or decoded and waiting for the model) are
        # bounded, so a burst cannot grow memory. Job images get their own, smaller share (one batch
        # on the model, one ready), taken before decoding is queued: a request's image then waits
        # behind at most that much job work, never behind a whole backlog of job decodes.
        self._slots = {INTERACTIVE: threading.BoundedSemaphore(4 * max_batch_size), BULK: threading.BoundedSemaphore(2 * max_batch_size)}
        self._batcher = BatchRunner(model, compute, max_batch_size, max_batch_wait_s, self._observe_batch, check_withdrawn)

    def _observe_batch(self, images: int, seconds: float) -> None:
        metrics.observe_batch(self.model.model_id, images, seconds)
        self._speeds.observe(self.model.model_id, images, seconds)

    def embed(self, inputs: list[ImageInput], bulk: bool = False, ticket: Ticket | None = None) -> list[ItemResult]:
        """Results in the order of ``inputs``; every image gets a vector or an error. Nothing more is
        fetched, decoded or computed for them once ``ticket`` is withdrawn."""
        ticket = ticket or Ticket()
        priority = BULK if bulk else INTERACTIVE
        slots = self._slots[priority]
        # URLs are fetched in parallel on I/O threads (a fair share of them per request); decoding
        # waits for its bytes in input order.
        fetches = self._fetches.fetch_all([item.url for item in inputs if item.url is not None], ticket.withdrawn_now)
        queued: list[Future[Future[Embedding]] | ImageInputError] = []
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
            slots.acquire()
            # Announced before decoding starts, so the batcher waits for it rather than run a batch
            # without it.
            self._batcher.expect()
            queued.append(self._prep_pool.submit(self._prepare, data, priority, ticket, slots.release))
        return [self._collect(item.index, entry) for item, entry in zip(inputs, queued)]

    def _prepare(self, data: bytes, priority: int, ticket: Ticket, release_slot: Callable[[], None]) -> Future[Embedding]:
        queued = False
        try:
            if not ticket.wanted():
                raise Withdrawn()
            started = time.perf_counter()
            deadline = ticket.deadline if math.isfinite(ticket.deadline) else None
            pixel_values = self._preprocess(self._decode_pool.decode(data, self._limits.decode, deadline))
            metrics.PREPROCESS_SECONDS.labels(self.model.model_id).observe(time.perf_counter() - started)
            future = self._batcher.submit(pixel_values, on_done=release_slot, priority=priority, announced=True, ticket=ticket)
            queued = True
            return future
        except ImageInputError:
            raise
        except DecodeAbandoned:
            raise WorkerStopping from None
        except Exception as exc:  # anything else a decoder or processor trips over is still the image's fault
            raise ImageInputError(ErrorCode.INVALID_IMAGE, f"image could not be processed: {type(exc).__name__}: {exc}") from None
        finally:
            if not queued:
                release_slot()
                self._batcher.withdraw()

    def _collect(self, index: int, queued: Future[Future[Embedding]] | ImageInputError) -> ItemResult:
        try:
            if isinstance(queued, ImageInputError):
                raise queued
            embedding = queued.result().result()
        except ImageInputError as exc:  # withdrawn work ends here too, from any stage
            metrics.IMAGES.labels(self.model.model_id, "withdrawn" if exc.code == Withdrawn.CODE else "rejected").inc()
            return ItemResult(index=index, error=exc.to_item_error())
        except WorkerStopping:
            raise
        except Exception as exc:  # the model failed, not the input: reported, never swallowed silently
            metrics.IMAGES.labels(self.model.model_id, "failed").inc()
            return ItemResult(index=index, error=ItemError(message=f"inference failed: {type(exc).__name__}: {exc}", code=ErrorCode.INFERENCE_FAILED))
        metrics.IMAGES.labels(self.model.model_id, "embedded").inc()
        return ItemResult(
            index=index,
            cls_b64=encode_f32(embedding.cls.numpy()),
            mean_b64=encode_f32(embedding.mean.numpy()),
            tokens=self.model.info.tokens_per_image,
        )

    def stop(self) -> None:
        self._batcher.stop()


class WorkerStopping(Exception):
    """The worker is shutting down: work not yet started goes back to the queue."""


class WorkerRuntime:
    """All models of this worker process and the pools they share."""

    def __init__(self, settings: Settings, budget: ThreadBudget, check_withdrawn: WithdrawalCheck | None = None) -> None:
        self.settings = settings
        self._check_withdrawn = check_withdrawn
        self._torch_threads = budget.torch_threads
        self.speeds = SpeedMeter()
        self.stopping = threading.Event()
        self.limits = InputLimits.from_settings(settings)
        self.fetch_pool = ThreadPoolExecutor(max_workers=budget.fetch_threads, thread_name_prefix="fetch")
        self.connections = ConnectionPool(settings.url_idle_connections)
        self.fetches = FetchQueue(self.fetch_pool, Fetcher(self.limits.fetch, self.connections), settings.url_fetch_concurrency_per_request)
        self.prep_pool = ThreadPoolExecutor(max_workers=budget.preprocess_threads, thread_name_prefix="prep", initializer=use_one_torch_thread)
        # One decode subprocess per preprocessing thread: a thread never waits for a free one.
        self.decode_pool = DecodePool(budget.preprocess_threads, settings.decode_cpu_seconds, settings.decode_max_bytes)
        self.compute = compute_executor()
        self.models: dict[str, ModelRuntime] = {}

    def load(self, model_id: str, device: torch.device, dtype: torch.dtype, token: str | None) -> ModelRuntime:
        """Load, check and warm up a model on the compute thread, where it will run."""
        return self.compute.submit(self._load, model_id, device, dtype, token).result()

    def _load(self, model_id: str, device: torch.device, dtype: torch.dtype, token: str | None) -> ModelRuntime:
        backend = resolve_backend(self.settings.backend, device)
        model = load_model(model_id, device, dtype, token, self.settings.max_batch_size, backend, self._torch_threads, self.settings.openvino_cache_dir)
        metrics.MODEL_LOAD_SECONDS.labels(model.model_id).set(model.load_seconds)
        limits = self.limits
        limits = replace(limits, decode=replace(limits.decode, resize=resize_rule(model.processor)))
        if self.settings.jpeg_draft:
            limits = replace(limits, decode=limits.decode.with_jpeg_draft(model.info.image_size))
        runtime = ModelRuntime(
            model,
            choose_preprocessor(model.processor, self.settings.preprocessing, probe_image()),
            limits,
            self.fetches,
            self.prep_pool,
            self.decode_pool,
            self.compute,
            self.settings.max_batch_size,
            self.settings.max_batch_wait_ms / 1000,
            self.settings.bulk_concurrency,
            self._check_withdrawn,
            self.speeds,
        )
        self.models[model.model_id] = runtime
        return runtime

    @contextmanager
    def bulk_slot(self, model_id: str) -> Iterator[None]:
        """A turn to embed a job chunk; raises WorkerStopping if shutdown begins while waiting."""
        runtime = self.models.get(model_id)
        if runtime is None:
            yield
            return
        while not runtime.bulk_slots.acquire(timeout=0.25):
            if self.stopping.is_set():
                raise WorkerStopping
        try:
            if self.stopping.is_set():
                raise WorkerStopping
            yield
        finally:
            runtime.bulk_slots.release()

    def stop(self) -> None:
        for runtime in self.models.values():
            runtime.stop()
        self.fetch_pool.shutdown(wait=False, cancel_futures=True)
        self.connections.close()
        self.prep_pool.shutdown(wait=False, cancel_futures=True)
        self.decode_pool.close()
        self.compute.shutdown(wait=False)


def configure_torch(settings: Settings, budget: ThreadBudget, device: torch.device) -> None:
    torch.set_num_threads(budget.torch_threads)
    if device.type == "cuda" and settings.cuda_memory_fraction is not None:
        # A cap for this process, so several workers (or other programs) can share one GPU.
        torch.cuda.set_per_process_memory_fraction(settings.cuda_memory_fraction, device)
