"""What a running worker holds: its loaded models, their batch threads, and the thread pools that
fetch, decode and preprocess images while the model computes."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch

from shared.protocol import ImageRef, ItemError, ItemResult
from shared.settings import Settings
from shared.vectors import encode_f32
from worker.batching import BatchObserver, BatchRunner, Embedding
from worker.decode import DecodeLimits, decode_image
from worker.errors import ImageInputError
from worker.fetch import FetchLimits
from worker.model_loader import LoadedModel, probe_image
from worker.preprocess import Preprocessor, choose_preprocessor
from worker.sources import read_image_bytes


@dataclass(frozen=True)
class InputLimits:
    fetch: FetchLimits
    decode: DecodeLimits

    @classmethod
    def from_settings(cls, settings: Settings) -> InputLimits:
        return cls(
            fetch=FetchLimits.from_strings(settings.url_fetch_timeout_s, settings.url_max_redirects, settings.max_image_bytes, settings.url_allowed_networks),
            decode=DecodeLimits(settings.max_image_bytes, settings.max_image_pixels, settings.max_image_side),
        )


class ModelRuntime:
    """One served model: images in, (CLS, MEAN) out, in the order they were given."""

    def __init__(self, model: LoadedModel, preprocess: Preprocessor, batcher: BatchRunner, limits: InputLimits, fetch_pool: ThreadPoolExecutor, prep_pool: ThreadPoolExecutor, max_prepared: int) -> None:
        self.model = model
        self._preprocess = preprocess
        self._batcher = batcher
        self._limits = limits
        self._fetch_pool = fetch_pool
        self._prep_pool = prep_pool
        # Preprocessed images waiting for the model are bounded, so a burst cannot grow memory.
        self._prepared_slots = threading.BoundedSemaphore(max_prepared)

    def embed(self, refs: list[ImageRef]) -> list[ItemResult]:
        fetched: list[Future[bytes] | None] = [
            self._fetch_pool.submit(read_image_bytes, ref, self._limits.fetch, self._limits.decode.max_bytes) if ref.kind == "url" else None
            for ref in refs
        ]
        queued: list[Future[Future[Embedding]] | ImageInputError] = []
        for ref, fetch in zip(refs, fetched):
            try:
                data = fetch.result() if fetch is not None else read_image_bytes(ref, self._limits.fetch, self._limits.decode.max_bytes)
            except ImageInputError as exc:
                queued.append(exc)
                continue
            queued.append(self._prep_pool.submit(self._prepare, data))
        return [self._collect(ref, item) for ref, item in zip(refs, queued)]

    def _prepare(self, data: bytes) -> Future[Embedding]:
        self._prepared_slots.acquire()
        try:
            pixel_values = self._preprocess(decode_image(data, self._limits.decode))
        except ImageInputError:
            self._prepared_slots.release()
            raise
        except Exception as exc:  # anything else a decoder or processor trips over is still the image's fault
            self._prepared_slots.release()
            raise ImageInputError("invalid_image", f"image could not be processed: {type(exc).__name__}: {exc}") from None
        return self._batcher.submit(pixel_values, on_done=self._prepared_slots.release)

    def _collect(self, ref: ImageRef, queued: Future[Future[Embedding]] | ImageInputError) -> ItemResult:
        try:
            if isinstance(queued, ImageInputError):
                raise queued
            embedding = queued.result().result()
        except ImageInputError as exc:
            return ItemResult(index=ref.index, error=exc.to_item_error())
        except Exception as exc:  # the model failed, not the input: reported, never swallowed silently
            return ItemResult(index=ref.index, error=ItemError(message=f"inference failed: {type(exc).__name__}: {exc}", type="server_error", code="inference_failed"))
        return ItemResult(index=ref.index, cls=encode_f32(embedding.cls.numpy()), mean=encode_f32(embedding.mean.numpy()), tokens=self.model.info.tokens_per_image)

    def stop(self) -> None:
        self._batcher.stop()


class WorkerRuntime:
    """All models of this worker process and the pools they share."""

    def __init__(self, settings: Settings, observe_batch: BatchObserver | None = None) -> None:
        self.settings = settings
        self.limits = InputLimits.from_settings(settings)
        self.fetch_pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="fetch")
        self.prep_pool = ThreadPoolExecutor(max_workers=settings.preprocess_threads, thread_name_prefix="prep")
        self.models: dict[str, ModelRuntime] = {}
        self._observe_batch = observe_batch

    def add(self, model: LoadedModel) -> ModelRuntime:
        batcher = BatchRunner(model, self.settings.max_batch_size, self.settings.max_batch_wait_ms / 1000, self._observe_batch)
        limits = self.limits
        if self.settings.jpeg_draft:
            # libjpeg may decode at 1/2, 1/4 or 1/8 scale, but never below twice the model's input size.
            side = 2 * max(model.info.image_size)
            limits = replace(limits, decode=replace(limits.decode, jpeg_draft_size=(side, side)))
        runtime = ModelRuntime(
            model,
            choose_preprocessor(model.processor, self.settings.preprocessing, probe_image()),
            batcher,
            limits,
            self.fetch_pool,
            self.prep_pool,
            max_prepared=4 * self.settings.max_batch_size,
        )
        self.models[model.model_id] = runtime
        return runtime

    def stop(self) -> None:
        for runtime in self.models.values():
            runtime.stop()
        self.fetch_pool.shutdown(wait=False, cancel_futures=True)
        self.prep_pool.shutdown(wait=False, cancel_futures=True)


def configure_torch_threads(settings: Settings) -> None:
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
