"""The Celery tasks: take a request's images through the model and store what came out."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, TypeVar

from celery import Task, shared_task
from celery.exceptions import Reject
from pydantic import ValidationError
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.errors import ErrorCode, oversized_dimensions
from shared.logs import request_id_var
from shared.protocol import EmbedPayload, EmbedRequests, ImageRef, ItemError, ItemResult, JobChunkPayload
from shared.queues import EMBED_REQUESTS_TASK, EMBED_TASK, JOB_CHUNK_TASK
from worker import metrics
from worker.batching import Embedding
from worker.images.sources import ImageInput, inputs_from, load_inputs
from worker.pipeline import ModelPipeline, Submitted, WorkerStopping
from worker.result_store import ResultStore
from worker.tickets import Ticket

log = logging.getLogger(__name__)

Message = TypeVar("Message", EmbedPayload, EmbedRequests, JobChunkPayload)

# Redis full (noeviction) or away: the chunk waits for Redis, as often as it takes.
REDIS_UNAVAILABLE = (OutOfMemoryError, RedisConnectionError, RedisTimeoutError)
# Any other failure of a whole chunk is tried this many more times, a growing delay apart (enough to
# ride out a passing fault, few enough that a chunk that always fails ends soon), before its items
# fail in place.
MAX_CHUNK_RETRIES = 3
CHUNK_RETRY_DELAY_S = 2


@dataclass
class WorkerResources:
    """What every task of this process uses; built once by ``python -m worker`` (``worker.process``)."""

    pipelines: dict[str, ModelPipeline]  # by model id
    stopping: threading.Event  # set at warm shutdown: job chunks still waiting for a turn go back to the queue
    store: ResultStore
    redis: Redis
    key_prefix: str
    node: str  # this worker's name in the served-models registry (its heartbeat)


class WorkerTask(Task):
    """Base of this worker's tasks: the per-process resources, installed once before tasks are consumed."""

    _resources: ClassVar[WorkerResources | None] = None

    @classmethod
    def install(cls, resources: WorkerResources) -> None:
        """Called once by ``python -m worker`` after the models are loaded, before tasks are consumed."""
        # On this class, not ``cls``: each task is a subclass of it, and all of them share one set.
        WorkerTask._resources = resources

    @property
    def resources(self) -> WorkerResources:
        if WorkerTask._resources is None:
            raise RuntimeError("worker resources not installed: start workers with `python -m worker`")
        return WorkerTask._resources


def embed_refs(context: WorkerResources, model: str, refs: list[ImageRef], bulk: bool = False, ticket: Ticket | None = None) -> list[ItemResult]:
    """Every ref's result, in order: a vector or an in-place error."""
    pipeline = context.pipelines.get(model)
    if pipeline is None:
        return _not_served(model, refs)
    return embed_inputs(pipeline, load_inputs(context.redis, refs), bulk, ticket)


def embed_inputs(pipeline: ModelPipeline, loaded: list[ImageInput | ItemResult], bulk: bool = False, ticket: Ticket | None = None) -> list[ItemResult]:
    """Every input's result, in order; those already answered (their bytes expired) keep their error."""
    return _merged(loaded, pipeline.submit(_images(loaded), bulk=bulk, ticket=ticket).results())


def _images(loaded: list[ImageInput | ItemResult]) -> list[ImageInput]:
    return [item for item in loaded if isinstance(item, ImageInput)]


def _merged(loaded: list[ImageInput | ItemResult], embedded: list[ItemResult]) -> list[ItemResult]:
    """The results of ``loaded`` in order: ``embedded`` for its images, the errors already in place for the rest."""
    results = iter(embedded)
    return [next(results) if isinstance(item, ImageInput) else item for item in loaded]


def _not_served(model: str, refs: list[ImageRef]) -> list[ItemResult]:
    return _failed(refs, f"this worker does not serve model {model!r}", ErrorCode.MODEL_NOT_SERVED)


def unsatisfiable_dimensions(context: WorkerResources, chunk: JobChunkPayload) -> ItemError | None:
    """The error every item of a job gets when its ``dimensions`` exceed the model's vectors.

    The API checks this at submit when a worker has already described the model; a job submitted
    before that is checked here, before anything is computed, so its results stay readable.
    """
    pipeline = context.pipelines.get(chunk.model)
    if chunk.dimensions is None or pipeline is None or chunk.dimensions <= (dim := pipeline.model.info.dim):
        return None
    return ItemError(message=oversized_dimensions(chunk.dimensions, dim), code=ErrorCode.INVALID_DIMENSIONS)


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
    if isinstance(message, EmbedRequests):  # each request's id is set around its own work
        yield message
        return
    with _request_id(message.request_id):
        yield message


@contextmanager
def _request_id(request_id: str) -> Iterator[None]:
    token = request_id_var.set(request_id)
    try:
        yield
    finally:
        request_id_var.reset(token)


def _failed(refs: list[ImageRef], message: str, code: ErrorCode) -> list[ItemResult]:
    return [ItemResult(index=ref.index, error=ItemError(message=message, code=code)) for ref in refs]


@shared_task(name=EMBED_TASK, base=WorkerTask, bind=True, ignore_result=True)
def embed(self: WorkerTask, payload: dict[str, Any]) -> None:
    """One synchronous request (one with URLs or large images, or one sent again)."""
    with _message("embed", EmbedPayload, payload) as request:
        if request is not None:
            answer_requests(self.resources, request.model, [request])


@shared_task(name=EMBED_REQUESTS_TASK, base=WorkerTask, bind=True, ignore_result=True)
def embed_requests(self: WorkerTask, payload: dict[str, Any]) -> None:
    """Synchronous requests an API process admitted together: their images share the batches."""
    with _message("embed", EmbedRequests, payload) as group:
        if group is not None:
            metrics.REQUESTS_PER_TASK.labels(group.model).observe(len(group.requests))
            answer_requests(self.resources, group.model, group.requests)


@dataclass
class _Answering:
    """A started request: its images on their way through the pipeline, or its results already known."""

    request: EmbedPayload
    began_at: float  # time.perf_counter()
    outcome: Submitted | list[ItemResult]
    loaded: list[ImageInput | ItemResult]

    def done(self) -> bool:
        return not isinstance(self.outcome, Submitted) or self.outcome.done()

    def futures(self) -> list[Future[Embedding]]:
        return self.outcome.futures() if isinstance(self.outcome, Submitted) else []

    def results(self) -> list[ItemResult]:
        """The request's results once its images are in; raises WorkerStopping when the worker stops first."""
        if not isinstance(self.outcome, Submitted):
            return self.outcome
        try:
            return _merged(self.loaded, self.outcome.results())
        except WorkerStopping:
            raise
        except Exception as exc:  # the client waits for an answer: a failure it can read, not a timeout
            return _worker_error(self.request, exc)


def _worker_error(request: EmbedPayload, exc: Exception) -> list[ItemResult]:
    with _request_id(request.request_id):
        log.exception("request failed in the worker; its images are answered with errors", extra={"model": request.model})
    return _failed(request.items, f"the worker failed on this request: {type(exc).__name__}: {exc}", ErrorCode.WORKER_ERROR)


def answer_requests(context: WorkerResources, model: str, requests: list[EmbedPayload]) -> None:
    """Start the requests still waited for, run their images through the model together, and
    answer each as soon as its results are in: those finished at the same moment in one round trip.

    Each is named as its request's holder when started, so the waiting API sends it again should
    this worker stop heartbeating: the broker would redeliver it only after the visibility timeout,
    past its deadline.
    """
    now = time.time()
    live = [request for request in requests if now <= request.deadline]
    starts = context.store.start(live, context.node) if live else []
    claimed = {id(request) for request, start in zip(live, starts) if start is not None}
    for request in requests:
        if id(request) not in claimed:
            with _request_id(request.request_id):
                log.info("skipping request the API stopped waiting for", extra={"model": request.model, "images": len(request.items)})
            metrics.TASKS.labels("embed", "skipped").inc()
    pipeline = context.pipelines.get(model)
    pending: list[_Answering] = []
    for request, start in zip(live, starts):
        if start is None:
            continue
        began_at = time.perf_counter()
        ticket = Ticket(request.reply_key, request.deadline, partial(context.store.is_abandoned, request.reply_key), looked_up_at=time.monotonic())
        try:
            loaded = inputs_from(request.items, start.image_bytes())
            outcome = _not_served(model, request.items) if pipeline is None else pipeline.submit(_images(loaded), ticket=ticket)
            pending.append(_Answering(request, began_at, outcome, loaded))
        except Exception as exc:  # the client waits for an answer: a failure it can read, not a timeout
            pending.append(_Answering(request, began_at, _worker_error(request, exc), []))
    while pending:
        if not any(answering.done() for answering in pending):
            wait([future for answering in pending for future in answering.futures()], return_when=FIRST_COMPLETED)
        answers: list[tuple[_Answering, list[ItemResult]]] = []
        for answering in [answering for answering in pending if answering.done()]:
            pending.remove(answering)
            try:
                answers.append((answering, answering.results()))
            except WorkerStopping:
                # Not answered: the API sees this worker withdrawn and sends the request to another one.
                with _request_id(answering.request.request_id):
                    log.info("worker stopping: request left unanswered for the API to re-send", extra={"model": model})
                metrics.TASKS.labels("embed", "abandoned").inc()
        if answers:
            _reply(context, answers)


def _reply(context: WorkerResources, answers: list[tuple[_Answering, list[ItemResult]]]) -> None:
    delivered = context.store.reply([(answering.request, results) for answering, results in answers])
    for (answering, results), outcome in zip(answers, delivered):
        request = answering.request
        with _request_id(request.request_id):
            if isinstance(outcome, Exception):
                # Redis refused or lost this reply: the client's wait ends at its deadline; the task's other requests go on.
                log.error("could not store the request's results", extra={"model": request.model, "error": f"{type(outcome).__name__}: {outcome}"})
                metrics.TASKS.labels("embed", "reply_failed").inc()
                continue
            metrics.TASKS.labels("embed", "done" if outcome else "discarded").inc()
            failed = sum(r.error is not None for r in results)
            extra = {"model": request.model, "images": len(results), "failed": failed, "seconds": round(time.perf_counter() - answering.began_at, 4)}
            log.info("request embedded" if outcome else "request embedded after the API stopped waiting; result discarded", extra=extra)


@shared_task(name=JOB_CHUNK_TASK, base=WorkerTask, bind=True, ignore_result=True, max_retries=MAX_CHUNK_RETRIES)
def embed_job_chunk(self: WorkerTask, payload: dict) -> None:
    """One slice of a job. Safe to run twice: results are stored per index, once.

    The message is acknowledged only once the chunk's results are stored. When Redis refuses or
    loses a write (full, unreachable), the chunk goes back to the queue however often that happens:
    waiting for Redis is right. Any other failure is a defect that may strike again: the chunk is
    tried ``MAX_CHUNK_RETRIES`` more times, then its unfinished items fail in place, so the job still
    completes and a poison chunk cannot loop forever.
    """
    with _message("job_chunk", JobChunkPayload, payload) as chunk:
        if chunk is None:
            return
        context = self.resources
        try:
            _run_chunk(context, chunk)
        except WorkerStopping:
            log.info("worker stopping: job chunk handed back to the queue", extra={"job_id": chunk.job_id})
            metrics.TASKS.labels("job_chunk", "requeued").inc()
            raise Reject("worker stopping", requeue=True) from None
        except REDIS_UNAVAILABLE as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.warning("Redis refused or lost a job chunk's write; the chunk goes back to the queue", extra={"job_id": chunk.job_id, "error": error})
            metrics.TASKS.labels("job_chunk", "requeued").inc()
            raise Reject("redis unavailable", requeue=True) from None
        except Exception as exc:
            attempt = self.request.retries + 1
            if attempt <= MAX_CHUNK_RETRIES:
                log.exception("job chunk failed; it will be tried again", extra={"job_id": chunk.job_id, "attempt": attempt, "max_retries": MAX_CHUNK_RETRIES})
                metrics.TASKS.labels("job_chunk", "retried").inc()
                try:
                    raise self.retry(countdown=CHUNK_RETRY_DELAY_S * attempt)
                except Reject:  # the retry could not be sent: keep this delivery instead
                    raise Reject("retry not sent", requeue=True) from None
            log.exception("job chunk failed on every try; its unfinished items fail in place", extra={"job_id": chunk.job_id, "attempts": attempt})
            message = f"the worker failed on this item's chunk {attempt} times: {type(exc).__name__}: {exc}"
            try:
                context.store.store_chunk(chunk, _failed(chunk.items, message, ErrorCode.CHUNK_FAILED), now=int(time.time()))
            except REDIS_UNAVAILABLE:
                raise Reject("redis unavailable", requeue=True) from None
            except Exception:  # the job's own keys are broken: nothing more this chunk can do
                log.exception("could not record the chunk's failure in its job; the chunk is dropped", extra={"job_id": chunk.job_id})
                metrics.TASKS.labels("job_chunk", "dropped").inc()
                return
            metrics.TASKS.labels("job_chunk", "failed").inc()


@contextmanager
def _chunk_turn(context: WorkerResources, model: str) -> Iterator[None]:
    """A turn among the job chunks of ``model``'s pipeline (none to take for a model not served here)."""
    pipeline = context.pipelines.get(model)
    if pipeline is None:
        yield
        return
    with pipeline.chunk_turn(context.stopping):
        yield


def _run_chunk(context: WorkerResources, chunk: JobChunkPayload) -> None:
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
        extra = {"job_id": chunk.job_id, "model": chunk.model, "dimensions": chunk.dimensions, "job_status": status}
        log.info("job chunk refused: dimensions larger than the model's", extra=extra)
        return
    with _chunk_turn(context, chunk.model):
        results = embed_refs(context, chunk.model, todo, bulk=True, ticket=Ticket(lookup=partial(context.store.job_withdrawn, chunk.job_id)))
    status = context.store.store_chunk(chunk, results, now=int(time.time()))
    metrics.TASKS.labels("job_chunk", "done").inc()
    extra = {"job_id": chunk.job_id, "model": chunk.model, "images": len(results), "already_done": len(done), "job_status": status}
    log.info("job chunk embedded", extra={**extra, "seconds": round(time.perf_counter() - started, 4)})
