"""Hand work to the workers through Celery and wait for the answer in Redis."""

from __future__ import annotations

import asyncio
import time
import uuid

import anyio.to_thread
import orjson

from api.errors import ApiError
from api.inputs import ParsedImage
from api.state import AppState
from shared.protocol import EmbedPayload, ImageRef, ItemResult
from shared.queues import EMBED_TASK, QueueKind, queue_for

# Publishing fails fast when Redis is away, so the client gets a 503 instead of a hung request.
PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}


async def check_backpressure(state: AppState, model: str, kind: QueueKind) -> None:
    """429 while the model's queue is full, so Redis does not grow without bound."""
    limit = state.settings.max_queue_depth if kind == "interactive" else state.settings.max_job_queue_depth
    depth = int(await state.redis.llen(queue_for(model, kind)))
    if depth >= limit:
        what = "requests" if kind == "interactive" else "job chunks"
        raise ApiError(429, f"model {model!r} has {depth} {what} queued (limit {limit}); retry later", code="queue_full", headers={"Retry-After": "2" if kind == "interactive" else "30"})


async def stash_images(state: AppState, blobs_key: str, images: list[ParsedImage], ttl_s: int) -> list[ImageRef]:
    """Store image bytes in one Redis hash for the workers, and reference them; URLs pass as they are."""
    refs = []
    pipe = state.redis.pipeline(transaction=False)
    for image in images:
        if image.data is not None:
            pipe.hset(blobs_key, str(image.index), image.data)
            refs.append(ImageRef(index=image.index, kind="blob", data=blobs_key))
        elif image.url is not None:
            refs.append(ImageRef(index=image.index, kind="url", data=image.url))
        if len(pipe) >= 256:  # bounded pipelines: a 100,000-image job is not one giant command buffer
            await pipe.execute()
    if any(ref.kind == "blob" for ref in refs):
        pipe.expire(blobs_key, ttl_s)
    if len(pipe):
        await pipe.execute()
    return refs


def _publish_all(state: AppState, name: str, payloads: list[dict[str, object]]) -> None:
    with state.celery.producer_or_acquire() as producer:
        for payload in payloads:
            state.celery.send_task(name, kwargs={"payload": payload}, retry_policy=PUBLISH_RETRY, producer=producer)


async def publish(state: AppState, name: str, payloads: list[dict[str, object]]) -> None:
    """Send Celery tasks (routed to the model's queue) from a worker thread: kombu is synchronous."""
    await anyio.to_thread.run_sync(_publish_all, state, name, payloads)


async def embed_and_wait(state: AppState, model: str, images: list[ParsedImage], request_id: str) -> list[ItemResult]:
    timeout = state.settings.request_timeout_s
    # Keys are per dispatch, not per request id: clients choose X-Request-ID and may reuse it.
    work_id = uuid.uuid4().hex
    refs = await stash_images(state, state.keys.blobs(work_id), images, ttl_s=int(timeout) + 60)
    reply_key = state.keys.reply(work_id)
    payload = EmbedPayload(request_id=request_id, model=model, items=refs, reply_key=reply_key, deadline=time.time() + timeout)
    await publish(state, EMBED_TASK, [payload.model_dump()])
    try:
        reply = await state.redis.blpop([reply_key], timeout=timeout)
    except asyncio.CancelledError:
        await _abandon(state, reply_key, timeout)
        raise
    if reply is None:
        await _abandon(state, reply_key, timeout)
        raise ApiError(504, f"no worker answered within {timeout:g} s; the request was withdrawn", code="timeout")
    return [ItemResult.model_validate(item) for item in orjson.loads(reply[1])]


async def _abandon(state: AppState, reply_key: str, timeout: float) -> None:
    """Tell workers to skip this request; a result that still arrives expires unread."""
    await state.redis.set(state.keys.abandoned(reply_key), b"1", ex=int(timeout) + 60)
