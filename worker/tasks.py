"""The Celery tasks: take a request's images through the model and store what came out."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from celery import shared_task
from pydantic import ValidationError

from shared.logs import request_id_var
from shared.protocol import EmbedPayload, ItemError, ItemResult
from shared.queues import EMBED_TASK
from worker.result_store import ResultStore
from worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    runtime: WorkerRuntime
    store: ResultStore


_context: WorkerContext | None = None


def install_context(context: WorkerContext) -> None:
    """Called once by ``python -m worker`` after the models are loaded, before tasks are consumed."""
    global _context
    _context = context


def _ctx() -> WorkerContext:
    if _context is None:
        raise RuntimeError("worker context not installed: start workers with `python -m worker`")
    return _context


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
        if time.time() > request.deadline or context.store.is_abandoned(request.request_id):
            log.info("skipping request the API stopped waiting for", extra={"model": request.model, "images": len(request.items)})
            return
        runtime = context.runtime.models.get(request.model)
        if runtime is None:
            error = ItemError(message=f"this worker does not serve model {request.model!r}", type="server_error", code="model_not_served")
            results = [ItemResult(index=ref.index, error=error) for ref in request.items]
        else:
            started = time.perf_counter()
            results = runtime.embed(request.items)
            log.info("request embedded", extra={"model": request.model, "images": len(results), "failed": sum(r.error is not None for r in results), "seconds": round(time.perf_counter() - started, 4)})
        context.store.reply(request, results)
    finally:
        request_id_var.reset(token)
