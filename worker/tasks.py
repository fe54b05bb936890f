"""The Celery tasks: take a request's images through the model and store what came out."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

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


@shared_task(name=EMBED_TASK, ignore_result=True)
def embed(payload: dict) -> None:
    try:
        request = EmbedPayload.model_validate(payload)
    except ValidationError as exc:
        log.error("dropping malformed embed message", extra={"error": str(exc)})
        return
    token = request_id_var.set(request.request_id)
    try:
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
    finally:
        request_id_var.reset(token)


@shared_task(name=JOB_CHUNK_TASK, ignore_result=True)
def embed_job_chunk(payload: dict) -> None:
    """One slice of a job. Safe to run twice: results are stored per index, once."""
    try:
        chunk = JobChunkPayload.model_validate(payload)
    except ValidationError as exc:
        log.error("dropping malformed job chunk message", extra={"error": str(exc)})
        return
    token = request_id_var.set(chunk.request_id)
    try:
        context = _ctx()
        status, done = context.store.start_chunk(chunk)
        if status in ("gone", "cancelled"):
            context.store.drop_blobs(chunk)
            log.info("skipping chunk of a cancelled or expired job", extra={"job_id": chunk.job_id, "images": len(chunk.items)})
            metrics.TASKS.labels("job_chunk", "skipped").inc()
            return
        todo = [ref for ref in chunk.items if ref.index not in done]
        started = time.perf_counter()
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
    finally:
        request_id_var.reset(token)
