"""Async jobs: create (split into chunk tasks), read state and results, cancel.

A job's body may hold 100,000 images: it is read as it arrives (``create_streamed_job``), each image is
checked as soon as it is complete, and image bytes go to Redis in bounded pipelines on the way, so
the API holds a window of the body, never the body, its parsed form and its decoded images at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from array import array
from collections.abc import AsyncIterator, Iterator
from itertools import islice
from typing import Any

import anyio
import orjson
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from redis.exceptions import RedisError

from api import metrics
from api.body_budget import BodyHold
from api.errors import ApiError, item_error, item_error_body
from api.inputs import ParsedInput, parse_job_item
from api.json_body import INLINE_PARSE_BYTES, StreamedJSONObject, parse_slots
from api.schemas import MAX_REPORTED_INPUT_ERRORS, EmbeddingRequest, ImageObject, embedding_item
from api.served_models import resolve_model, validate_dimensions
from api.state import AppState
from api.sync_requests import check_job_backpressure, publish
from shared.errors import ErrorCode
from shared.protocol import BlobRef, ImageRef, ItemError, ItemResult, JobChunkPayload, UrlRef
from shared.queues import JOB_CHUNK_TASK
from shared.store.jobs import JobRecord, job_created_at, new_job_id
from shared.store.requests import PIPELINE_COMMANDS, store_image_bytes

log = logging.getLogger(__name__)

RESULT_PAGE = 500
# Body bytes parsed per step (off the event loop, like a whole body): big enough that the thread hop
# is noise, small enough that the window the API holds stays a few MiB.
PARSE_STEP_BYTES = 2**20
# Decoded image bytes sent to Redis per pipeline (and at most PIPELINE_COMMANDS images), each
# pipeline checked against the Redis memory budget first.
STORE_STEP_BYTES = 8 * 2**20
# Chunk tasks built and published per step, and items' refusals stored per script call.
PUBLISH_STEP = 256
# What stands in for the images in the final validation of a body whose items were all well-formed.
_WELL_FORMED = "image"


class JobImages:
    """A job's images on their way into Redis while its body is read: bytes go to the job's blob hash
    in bounded pipelines, each within the Redis memory budget; URLs and items refused in place are kept
    (a few bytes each) until the job is created. A pipeline Redis refuses (full, unreachable) stops the
    storing; the refusal is raised once the job has passed every earlier check (``create``)."""

    def __init__(self, state: AppState) -> None:
        self._state = state
        self.job_id = new_job_id()
        self.blobs_key = state.jobs.keys.blobs(self.job_id)
        self.total = 0
        self.accepted = array("q")  # indices of the images handed to workers, in order
        self.urls: dict[int, str] = {}
        self.refused: list[tuple[int, ItemError]] = []
        self.failure: Exception | None = None
        self.written = False  # whether anything of the job may be in Redis
        self._pending: list[tuple[int, bytes]] = []
        self.pending_bytes = 0

    async def add(self, images: list[ParsedInput]) -> None:
        for image in images:
            self.total += 1
            if image.error is not None:
                self.refused.append((image.index, image.error))
                continue
            self.accepted.append(image.index)
            if image.url is not None:
                self.urls[image.index] = image.url
            elif image.data is not None:
                self._pending.append((image.index, image.data))
                self.pending_bytes += len(image.data)
                if len(self._pending) >= PIPELINE_COMMANDS - 1 or self.pending_bytes >= STORE_STEP_BYTES:
                    await self.flush()

    async def flush(self) -> None:
        pending, size = self._pending, self.pending_bytes
        self._pending, self.pending_bytes = [], 0
        if not pending or self.failure is not None:
            return
        try:
            async with self._state.memory.reserve(size, "job"):
                self.written = True  # a pipeline that fails may have stored part of its images
                await store_image_bytes(self._state.redis, self.blobs_key, pending, self._state.settings.job_result_ttl_s)
        except (ApiError, RedisError) as exc:  # ApiError: the memory budget's 507
            self.failure = exc

    def chunks(self, job: JobRecord, request_id: str) -> Iterator[dict[str, Any]]:
        """The job's chunk tasks, built as they are published."""
        size = self._state.settings.job_chunk_size
        for start in range(0, len(self.accepted), size):
            items: list[ImageRef] = [
                UrlRef(index=index, url=self.urls[index]) if index in self.urls else BlobRef(index=index, blob_key=self.blobs_key)
                for index in self.accepted[start : start + size]
            ]
            yield JobChunkPayload(request_id=request_id, job_id=job.id, model=job.model, items=items, owner=job.owner, dimensions=job.dimensions).model_dump()

    async def discard(self) -> None:
        """Delete whatever the job stored: its submission failed."""
        if self.written:
            await _discard(self._state, self.job_id)


class JobItems:
    """The items of a job's ``input`` as the body hands them out (in a worker thread): each checked
    against the request's schema, then parsed, a malformed image becoming that item's error. The
    first items the schema refuses are kept for the error answer; from the first one on, nothing
    more is decoded, since the job will be refused."""

    def __init__(self, max_image_bytes: int) -> None:
        self._max_image_bytes = max_image_bytes
        self.malformed: list[tuple[int, Any]] = []

    def parse(self, items: list[tuple[int, Any]]) -> list[ParsedInput]:
        images = []
        for index, value in items:
            image: str | ImageObject
            if isinstance(value, str):
                image = value
            elif isinstance(value, dict):
                if self._enough_errors():
                    continue
                try:
                    image = ImageObject.model_validate(value)
                except ValidationError:
                    self.malformed.append((index, value))
                    continue
            else:
                if not self._enough_errors():
                    self.malformed.append((index, value))
                continue
            if not self.malformed:
                images.append(parse_job_item(index, image, self._max_image_bytes))
        return images

    def _enough_errors(self) -> bool:
        return len(self.malformed) >= MAX_REPORTED_INPUT_ERRORS

    def request(self, body: StreamedJSONObject) -> EmbeddingRequest:
        """The whole request validated once its body has ended; its input stands in for the items,
        which were checked on the way (the malformed ones are validated again, for their errors)."""
        probe: object
        if body.array_seen:
            probe = [value for _, value in self.malformed] if self.malformed else [_WELL_FORMED] * min(body.items, 1)
        else:
            probe = body.field_value
        return body.validate(EmbeddingRequest, probe, [index for index, _ in self.malformed])


async def create_streamed_job(state: AppState, body: AsyncIterator[bytes], hold: BodyHold, request_id: str, owner: str) -> JobRecord:
    """``POST /v1/jobs``: the body is parsed as it arrives, its images stored on the way, and the job is
    created once the body has ended and passed every check, in the order a whole body would meet them
    (JSON, the request's schema, model, dimensions, queue depth, key quota, Redis memory budget)."""
    settings = state.settings
    reader = StreamedJSONObject("input", settings.max_job_inputs)
    items = JobItems(settings.max_image_bytes)
    images = JobImages(state)
    window = _BodyWindow(hold)
    try:
        unread = bytearray()
        async for chunk in body:
            unread += chunk
            window.received += len(chunk)
            window.hold(len(unread), images.pending_bytes)
            if len(unread) >= PARSE_STEP_BYTES:
                await images.add(await _parse_step(reader, items, bytes(unread), window))
                unread.clear()
        if not window.received:
            raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
        await images.add(await _parse_step(reader, items, bytes(unread), window, last=True))
        del unread
        await images.flush()
        window.hold(0, 0)
        request = items.request(reader)
        if isinstance(request.input, str):  # one image, not an array: it came whole
            await images.add([parse_job_item(0, request.input, settings.max_image_bytes)])
            await images.flush()
        model = await _checked_model(state, request)
        return await _create(state, images, request, model, request_id, owner)
    except BaseException:
        # Refused or interrupted part-way (a bad body, the client gone, Redis full): the client gets an
        # error and nothing the job stored stays behind.
        await asyncio.shield(images.discard())
        raise


class _BodyWindow:
    """What the API holds of a job's body at a time, on the body budget: bytes not parsed yet, those the
    parser may hold of an unfinished item (at most the bytes fed since an item last completed), and
    decoded images not stored yet. 429 when the budget has no room for them."""

    def __init__(self, hold: BodyHold) -> None:
        self._hold = hold
        self.received = 0
        self._in_parser = 0

    def hold(self, unread: int, unstored: int) -> None:
        # The three are parts of what was received (an image decoded is smaller than its base64), so
        # never more than that: a job within the body limit fits the smallest budget allowed.
        if not self._hold.resize(min(unread + self._in_parser + unstored, self.received)):
            raise self._hold.budget.refusal(self.received)

    def fed(self, size: int, completed_items: bool) -> None:
        self._in_parser = size if completed_items else self._in_parser + size


async def _parse_step(reader: StreamedJSONObject, items: JobItems, data: bytes, window: _BodyWindow, last: bool = False) -> list[ParsedInput]:
    """``data`` through the parser (and its end, when ``last``), and the items it completed checked and parsed."""

    def step() -> list[ParsedInput]:
        completed = reader.feed(data)
        if last:
            completed += reader.end()
        window.fed(len(data), bool(completed))
        return items.parse(completed)

    if len(data) <= INLINE_PARSE_BYTES:
        return step()
    return await anyio.to_thread.run_sync(step, limiter=parse_slots())


async def create_job(state: AppState, body: EmbeddingRequest, request_id: str, owner: str) -> JobRecord:
    """A job from a request already parsed (a Batch API line)."""
    settings = state.settings
    model = await _checked_model(state, body)
    values = [body.input] if isinstance(body.input, str) else body.input
    if len(values) > settings.max_job_inputs:
        raise ApiError(ErrorCode.TOO_MANY_INPUTS, f"input has {len(values)} images, over the limit of {settings.max_job_inputs} per request", param="input")
    images = JobImages(state)
    try:
        for index, value in enumerate(values):
            await images.add([parse_job_item(index, value, settings.max_image_bytes)])
        await images.flush()
        return await _create(state, images, body, model, request_id, owner)
    except BaseException:
        await asyncio.shield(images.discard())
        raise


async def _checked_model(state: AppState, body: EmbeddingRequest) -> str:
    model = resolve_model(state, body.model)
    await validate_dimensions(state, model, body.dimensions)
    return model


async def _create(state: AppState, images: JobImages, body: EmbeddingRequest, model: str, request_id: str, owner: str) -> JobRecord:
    """The job's record and tasks, its images being in Redis, after the checks that come last for any
    request; raises whatever refused it (the caller discards the images)."""
    settings = state.settings
    await check_job_backpressure(state, model)
    job = JobRecord(
        id=images.job_id, status="queued", model=model, total=images.total, created_at=int(time.time()), owner=owner,
        encoding_format=body.encoding_format, pooling=body.pooling, dimensions=body.dimensions,
    )  # fmt: skip
    # The job's images count against its key until they finish, or until the job expires unfinished.
    await state.quotas.admit(owner, model, job.id, job.total, job.created_at + settings.job_result_ttl_s)
    try:
        if images.failure is not None:
            raise images.failure
        async with state.memory.reserve(await state.memory.results_need(model, len(images.accepted)), "job"):
            # Order matters: image bytes (stored by now), then the job record, then the tasks that need both.
            images.written = True
            await state.jobs.create(job)
            for start in range(0, len(images.refused), PUBLISH_STEP):
                refused = [ItemResult(index=index, error=error) for index, error in images.refused[start : start + PUBLISH_STEP]]
                await state.jobs.store_results(job, refused)
            chunks = images.chunks(job, request_id)
            while step := list(islice(chunks, PUBLISH_STEP)):
                await publish(state, JOB_CHUNK_TASK, step)
    except BaseException:
        # Chunks already queued find no job and are skipped.
        await asyncio.shield(state.quotas.release(owner, job.id))
        raise
    metrics.JOB_IMAGES.labels(model).inc(job.total)
    return await get_job(state, job.id, owner)


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
