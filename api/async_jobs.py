"""Async jobs: create (split into chunk tasks), read state and results, cancel."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import orjson
from redis.exceptions import RedisError

from api import metrics
from api.errors import ApiError, item_error, item_error_body
from api.inputs import ParsedInput, parse_inputs
from api.schemas import EmbeddingRequest, embedding_item
from api.served_models import resolve_model, validate_dimensions
from api.state import AppState
from api.sync_requests import check_job_backpressure, publish, stash_images
from shared.errors import ErrorCode
from shared.protocol import ItemResult, JobChunkPayload
from shared.queues import JOB_CHUNK_TASK
from shared.store.jobs import JobRecord, job_created_at, new_job_id

log = logging.getLogger(__name__)

RESULT_PAGE = 500


async def create_job(state: AppState, body: EmbeddingRequest, request_id: str, owner: str) -> JobRecord:
    settings = state.settings
    model = resolve_model(state, body.model)
    await validate_dimensions(state, model, body.dimensions)
    images = parse_inputs(body.input, settings.max_job_inputs, settings.max_image_bytes, strict=False)
    await check_job_backpressure(state, model)
    job = JobRecord(
        id=new_job_id(), status="queued", model=model, total=len(images), created_at=int(time.time()), owner=owner,
        encoding_format=body.encoding_format, pooling=body.pooling, dimensions=body.dimensions,
    )  # fmt: skip
    accepted = [image for image in images if image.error is None]
    # The job's images count against its key until they finish, or until the job expires unfinished.
    await state.quotas.admit(owner, model, job.id, job.total, job.created_at + settings.job_result_ttl_s)
    try:
        async with state.memory.reserve(await state.memory.need(model, accepted), "job"):
            try:
                await _store_and_publish(state, job, images, accepted, request_id)
            except BaseException:
                # Refused (Redis full, unreachable) or interrupted part-way: the client gets an error and
                # nothing the job wrote stays behind. Chunks already queued find no job and are skipped.
                await asyncio.shield(_discard(state, job.id))
                raise
    except BaseException:
        await asyncio.shield(state.quotas.release(owner, job.id))
        raise
    metrics.JOB_IMAGES.labels(model).inc(job.total)
    return await get_job(state, job.id, owner)


async def _store_and_publish(state: AppState, job: JobRecord, images: list[ParsedInput], accepted: list[ParsedInput], request_id: str) -> None:
    # Order matters: image bytes, then the job record, then the tasks that need both.
    refs = await stash_images(state, state.jobs.keys.blobs(job.id), accepted, state.settings.job_result_ttl_s)
    await state.jobs.create(job)
    refused = [ItemResult(index=image.index, error=image.error) for image in images if image.error is not None]
    if refused:
        await state.jobs.store_results(job, refused)
    size = state.settings.job_chunk_size
    chunks = [
        JobChunkPayload(
            request_id=request_id, job_id=job.id, model=job.model, items=refs[start : start + size], owner=job.owner, dimensions=job.dimensions
        ).model_dump()
        for start in range(0, len(refs), size)
    ]
    await publish(state, JOB_CHUNK_TASK, chunks)


async def _discard(state: AppState, job_id: str) -> None:
    try:
        await state.jobs.discard(job_id)
    except RedisError as exc:  # Redis is away: the keys still expire with the job's TTL
        log.warning("could not delete a refused job's keys", extra={"job_id": job_id, "error": type(exc).__name__})


def job_not_found(state: AppState, job_id: str) -> ApiError:
    """The one answer for an id that is malformed, unknown, expired or another key's job, so that
    ids of other keys' jobs cannot be told from made-up ones."""
    created = job_created_at(job_id)
    ttl = state.settings.job_result_ttl_s
    if created is not None and time.time() - created > ttl:
        return ApiError(
            ErrorCode.JOB_EXPIRED,
            f"job {job_id!r} has expired: jobs and their results are kept for {ttl} s after their last update",
            param="job_id",
        )
    return ApiError(ErrorCode.JOB_NOT_FOUND, f"no job with id {job_id!r}", param="job_id")


async def get_job(state: AppState, job_id: str, owner: str) -> JobRecord:
    job = await state.jobs.get(job_id)
    if job is None or job.owner != owner:
        raise job_not_found(state, job_id)
    return job


async def cancel_job(state: AppState, job_id: str, owner: str) -> JobRecord:
    if await state.jobs.cancel(job_id, owner) == "gone":
        raise job_not_found(state, job_id)
    return await get_job(state, job_id, owner)


async def _readable_job(state: AppState, job_id: str, owner: str) -> JobRecord:
    job = await get_job(state, job_id, owner)
    if job.results_deleted:
        raise ApiError(ErrorCode.JOB_RESULTS_DELETED, f"the results of job {job_id!r} were deleted (the job was cancelled or deleted)", param="job_id")
    return job


def _item(job: JobRecord, result: ItemResult) -> dict[str, object]:
    if result.error is not None:
        return item_error_body(result)
    try:
        return embedding_item(result, job.pooling, job.encoding_format, job.dimensions)
    except ApiError as exc:
        # Vectors shorter than the job's dimensions, stored by a worker that did not check them
        # (before an upgrade): that item failed, the read does not.
        return item_error(result.index, exc.code, exc.message)


async def item_results(state: AppState, job: JobRecord, start: int, stop: int) -> list[ItemResult]:
    """The stored results of the items with index in [start, stop), in index order; unfinished ones left out."""
    return await state.jobs.results(job.id, list(range(start, min(stop, job.total))))


async def _page(state: AppState, job: JobRecord, start: int, stop: int) -> list[dict[str, object]]:
    return [_item(job, result) for result in await item_results(state, job, start, stop)]


async def result_page(state: AppState, job_id: str, owner: str, offset: int, limit: int) -> dict[str, object]:
    """Finished items with index in [offset, offset + limit), in index order; unfinished ones are
    left out until they finish."""
    job = await _readable_job(state, job_id, owner)
    return {"object": "list", "data": await _page(state, job, offset, offset + limit), "has_more": offset + limit < job.total}


async def result_lines(state: AppState, job_id: str, owner: str) -> tuple[JobRecord, AsyncIterator[bytes]]:
    """Every finished item as one JSON line, in index order, read page by page."""
    job = await _readable_job(state, job_id, owner)

    async def lines() -> AsyncIterator[bytes]:
        for start in range(0, job.total, RESULT_PAGE):
            for item in await _page(state, job, start, start + RESULT_PAGE):
                yield orjson.dumps(item, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"

    return job, lines()
