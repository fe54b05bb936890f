"""The Celery tasks: take a request's images through the model and store what came out."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from celery import shared_task
from celery.exceptions import Reject
from pydantic import ValidationError
from redis import Redis

from shared.logs import request_id_var
from shared.protocol import EmbedPayload, ImageRef, ItemError, ItemResult, JobChunkPayload
from shared.queues import EMBED_TASK, JOB_CHUNK_TASK
from worker import metrics
from worker.result_store import ResultStore
from worker.runtime import WorkerRuntime, WorkerStopping
from worker.sources import ImageInput, load_inputs

log = logging.getLogger(__name__)

Message = TypeVar("Message", EmbedPayload, JobChunkPayload)


@dataclass
class WorkerContext:
    runtime: WorkerRuntime
    store: ResultStore
    redis: Redis


_context: WorkerContext | None = None


def install_context(context: WorkerContext) -> None:
    """Called once by ``python -m worker`` after the models are loaded, before tasks are consumed."""
    global _context
    _context = context


def _ctx() -> WorkerContext:
    if _context is None:
        raise RuntimeError("worker context not installed: start workers with `python -m worker`")
    return _context


def embed_refs(context: WorkerContext, model: str, refs: list[ImageRef], bulk: bool = False) -> list[ItemResult]:
    """Every ref's result, in order: a vector or an in-place error."""
    runtime = context.runtime.models.get(model)
    if runtime is None:
        error = ItemError(message=f"this worker does not serve model {model!r}", type="server_error", code="model_not_served")
        return [ItemResult(index=ref.index, error=error) for ref in refs]
    loaded = load_inputs(context.redis, refs)
    embedded = iter(runtime.embed([item for item in loaded if isinstance(item, ImageInput)], bulk=bulk))
    return [next(embedded) if isinstance(item, ImageInput) else item for item in loaded]


def unsatisfiable_dimensions(context: WorkerContext, chunk: JobChunkPayload) -> ItemError | None:
    """The error every item of a job gets when its ``dimensions`` exceed the model's vectors.

    The API checks this at submit when a worker has already described the model; a job submitted
    before that is checked here, before anything is computed, so its results stay readable.
    """
    runtime = context.runtime.models.get(chunk.model)
    if chunk.dimensions is None or runtime is None or chunk.dimensions <= (dim := runtime.model.info.dim):
        return None
    return ItemError(message=f"dimensions={chunk.dimensions} is larger than the model's embedding size {dim}", code="invalid_dimensions")


@contextmanager
def _message(kind: str, schema: type[Message], payload: dict) -> Iterator[Message | None]:
    """The validated message, its request id on every log line of the work; None if malformed."""
    try:
        message = schema.model_validate(payload)
    except ValidationError as exc:
        log.error("dropping malformed message", extra={"kind": kind, "error": str(exc)})
        metrics.TASKS.labels(kind, "malformed").inc()
        yield None
        return
    token = request_id_var.set(message.request_id)
    try:
        yield message
    finally:
        request_id_var.reset(token)


@shared_task(name=EMBED_TASK, ignore_result=True)
def embed(payload: dict) -> None:
    with _message("embed", EmbedPayload, payload) as request:
        if request is None:
            return
        context = _ctx()
        if time.time() > request.deadline or context.store.is_abandoned(request.reply_key):
            log.info("skipping request the API stopped waiting for", extra={"model": request.model, "images": len(request.items)})
            metrics.TASKS.labels("embed", "skipped").inc()
            return
        started = time.perf_counter()
        results = embed_refs(context, request.model, request.items)
        delivered = context.store.reply(request, results)
        metrics.TASKS.labels("embed", "done" if delivered else "discarded").inc()
        log.info("request embedded" if delivered else "request embedded after the API stopped waiting; result discarded", extra={"model": request.model, "images": len(results), "failed": sum(r.error is not None for r in results), "seconds": round(time.perf_counter() - started, 4)})


@shared_task(name=JOB_CHUNK_TASK, ignore_result=True)
def embed_job_chunk(payload: dict) -> None:
    """One slice of a job. Safe to run twice: results are stored per index, once."""
    with _message("job_chunk", JobChunkPayload, payload) as chunk:
        if chunk is None:
            return
        context = _ctx()
        status, done = context.store.start_chunk(chunk)
        if status in ("gone", "cancelled"):
            context.store.drop_blobs(chunk)
            log.info("skipping chunk of a cancelled or expired job", extra={"job_id": chunk.job_id, "images": len(chunk.items)})
            metrics.TASKS.labels("job_chunk", "skipped").inc()
            return
        todo = [ref for ref in chunk.items if ref.index not in done]
        started = time.perf_counter()
        if (error := unsatisfiable_dimensions(context, chunk)) is not None:
            status = context.store.store_chunk(chunk, [ItemResult(index=ref.index, error=error) for ref in todo], now=int(time.time()))
            metrics.TASKS.labels("job_chunk", "refused").inc()
            log.info("job chunk refused: dimensions larger than the model's", extra={"job_id": chunk.job_id, "model": chunk.model, "dimensions": chunk.dimensions, "job_status": status})
            return
        try:
            with context.runtime.bulk_slot(chunk.model):
                results = embed_refs(context, chunk.model, todo, bulk=True)
        except WorkerStopping:
            log.info("worker stopping: job chunk handed back to the queue", extra={"job_id": chunk.job_id})
            metrics.TASKS.labels("job_chunk", "requeued").inc()
            raise Reject("worker stopping", requeue=True) from None
        status = context.store.store_chunk(chunk, results, now=int(time.time()))
        metrics.TASKS.labels("job_chunk", "done").inc()
        log.info("job chunk embedded", extra={"job_id": chunk.job_id, "model": chunk.model, "images": len(results), "already_done": len(done), "job_status": status, "seconds": round(time.perf_counter() - started, 4)})
