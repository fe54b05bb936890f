"""Async jobs: create (split into chunk tasks), read state and results, cancel."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import orjson

from api import metrics
from api.dispatch import check_job_backpressure, publish, stash_images
from api.errors import ApiError
from api.formatting import embedding_item, item_error_body
from api.inputs import parse_inputs
from api.schemas import EmbeddingRequest
from api.state import AppState
from api.workers import resolve_model, validate_dimensions
from shared.jobs import JobRecord, job_created_at, new_job_id, store_results_args
from shared.protocol import ItemResult, JobChunkPayload
from shared.queues import JOB_CHUNK_TASK

RESULT_PAGE = 500


async def create_job(state: AppState, body: EmbeddingRequest, request_id: str) -> JobRecord:
    settings = state.settings
    model = resolve_model(state, body.model)
    await validate_dimensions(state, model, body.dimensions)
    images = parse_inputs(body.input, settings.max_job_inputs, settings.max_image_bytes, strict=False)
    await check_job_backpressure(state, model)
    job = JobRecord(id=new_job_id(), status="queued", model=model, total=len(images), created_at=int(time.time()), encoding_format=body.encoding_format, pooling=body.pooling, dimensions=body.dimensions)
    ttl = settings.job_result_ttl_s
    keys = state.keys
    # Order matters: image bytes, then the job record, then the tasks that need both.
    refs = await stash_images(state, keys.job_blobs(job.id), [image for image in images if image.error is None], ttl)
    fields = [item for pair in job.to_redis().items() for item in pair]
    await state.create_job_script(keys=[keys.job(job.id), keys.job_counts()], args=[ttl, *fields])
    refused = [ItemResult(index=image.index, error=image.error) for image in images if image.error is not None]
    if refused:
        await store_results(state, job.id, refused)
    size = settings.job_chunk_size
    chunks = [JobChunkPayload(request_id=request_id, job_id=job.id, model=model, items=refs[start : start + size]).model_dump() for start in range(0, len(refs), size)]
    try:
        await publish(state, JOB_CHUNK_TASK, chunks)
    except Exception:
        # Not accepted: the client gets an error and retries; nothing half-queued lingers.
        await _cancel(state, job.id)
        raise
    metrics.JOB_IMAGES.labels(model).inc(job.total)
    return await get_job(state, job.id)


async def store_results(state: AppState, job_id: str, results: list[ItemResult]) -> None:
    args = store_results_args(state.settings.job_result_ttl_s, int(time.time()), results)
    await state.store_results_script(keys=[state.keys.job(job_id), state.keys.job_results(job_id), state.keys.job_counts()], args=args)


def _not_found(state: AppState, job_id: str) -> ApiError:
    created = job_created_at(job_id)
    ttl = state.settings.job_result_ttl_s
    if created is not None and time.time() - created > ttl:
        return ApiError(404, f"job {job_id!r} has expired: jobs and their results are kept for {ttl} s after their last update", code="job_expired", param="job_id")
    return ApiError(404, f"no job with id {job_id!r}", code="job_not_found", param="job_id")


async def get_job(state: AppState, job_id: str) -> JobRecord:
    fields = await state.redis.hgetall(state.keys.job(job_id))
    if not fields:
        raise _not_found(state, job_id)
    return JobRecord.from_redis(fields)


async def _cancel(state: AppState, job_id: str) -> bytes:
    keys = state.keys
    return await state.cancel_script(keys=[keys.job(job_id), keys.job_results(job_id), keys.job_blobs(job_id), keys.job_counts()], args=[int(time.time())])


async def cancel_job(state: AppState, job_id: str) -> JobRecord:
    status = await _cancel(state, job_id)
    if status == b"gone":
        raise _not_found(state, job_id)
    return await get_job(state, job_id)


async def _readable_job(state: AppState, job_id: str) -> JobRecord:
    job = await get_job(state, job_id)
    if job.results_deleted:
        raise ApiError(404, f"the results of job {job_id!r} were deleted (the job was cancelled or deleted)", code="job_results_deleted", param="job_id")
    return job


def _item(job: JobRecord, result: ItemResult) -> dict[str, object]:
    if result.error is not None:
        return item_error_body(result)
    return embedding_item(result, job.pooling, job.encoding_format, job.dimensions)


async def item_results(state: AppState, job: JobRecord, start: int, stop: int) -> list[ItemResult]:
    """The stored results of the items with index in [start, stop), in index order; unfinished ones left out."""
    indices = [str(i) for i in range(start, min(stop, job.total))]
    if not indices:
        return []
    stored = await state.redis.hmget(state.keys.job_results(job.id), indices)
    return [ItemResult.model_validate_json(raw) for raw in stored if raw is not None]


async def _page(state: AppState, job: JobRecord, start: int, stop: int) -> list[dict[str, object]]:
    return [_item(job, result) for result in await item_results(state, job, start, stop)]


async def result_page(state: AppState, job_id: str, offset: int, limit: int) -> dict[str, object]:
    """Finished items with index in [offset, offset + limit), in index order; unfinished ones are
    left out until they finish."""
    job = await _readable_job(state, job_id)
    return {"object": "list", "data": await _page(state, job, offset, offset + limit), "has_more": offset + limit < job.total}


async def result_lines(state: AppState, job_id: str) -> tuple[JobRecord, AsyncIterator[bytes]]:
    """Every finished item as one JSON line, in index order, read page by page."""
    job = await _readable_job(state, job_id)

    async def lines() -> AsyncIterator[bytes]:
        for start in range(0, job.total, RESULT_PAGE):
            for item in await _page(state, job, start, start + RESULT_PAGE):
                yield orjson.dumps(item, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"

    return job, lines()
