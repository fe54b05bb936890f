"""Hand work to the workers through Celery and wait for the answer in Redis."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

import orjson

from api.admission import Admission
from api.errors import ApiError
from api.inputs import ParsedInput
from api.state import AppState
from shared.errors import ErrorCode
from shared.protocol import BlobRef, EmbedPayload, ImageRef, ItemResult, UrlRef
from shared.queues import EMBED_TASK, queue_depth
from shared.store.claims import HolderState
from shared.store.requests import SyncRequest, store_image_bytes

log = logging.getLogger(__name__)

# A worker that stopped heartbeating has its request sent again at most this often: a request that
# kills every worker it reaches must not take the fleet down one worker at a time.
MAX_REDISPATCHES = 2


async def check_job_backpressure(state: AppState, model: str) -> None:
    """429 while the model's job queue is full, so Redis does not grow without bound."""
    limit = state.settings.max_job_queue_depth
    depth = await queue_depth(state.redis, model, "bulk")
    if depth >= limit:
        raise ApiError(ErrorCode.QUEUE_FULL, f"model {model!r} has {depth} job chunks queued (limit {limit}); retry later", headers={"Retry-After": "30"})


async def stash_images(state: AppState, blobs_key: str, images: list[ParsedInput], ttl_s: int) -> list[ImageRef]:
    """Store image bytes in one Redis hash for the workers, and reference them; URLs pass as they are."""
    refs: list[ImageRef] = []
    for image in images:
        if image.data is not None:
            refs.append(BlobRef(index=image.index, blob_key=blobs_key))
        elif image.url is not None:
            refs.append(UrlRef(index=image.index, url=image.url))
    await store_image_bytes(state.redis, blobs_key, ((image.index, image.data) for image in images if image.data is not None), ttl_s)
    return refs


async def publish(state: AppState, name: str, payloads: list[dict[str, object]]) -> None:
    """Send Celery tasks, routed to the model's queue."""
    await state.tasks.publish(name, payloads)


class ClientGone(Exception):
    """The client closed its connection while its request waited."""


async def embed_and_wait(
    state: AppState, key_id: str, model: str, images: list[ParsedInput], request_id: str, client_gone: Callable[[], Awaitable[None]]
) -> list[ItemResult]:
    """Enqueue the images and wait for their results until the request's deadline; they count
    against the key's quota until then.

    However the wait ends without an answer (deadline, client gone, an error), the request is
    withdrawn, so no worker computes it. ``client_gone()`` completes when the client disconnects.
    """
    timeout = state.settings.request_timeout_s
    deadline = time.time() + timeout
    # Keys are per dispatch, not per request id: clients choose X-Request-ID and may reuse it.
    work_id = uuid.uuid4().hex
    await state.quotas.admit(key_id, model, work_id, len(images), deadline)
    exchange = state.requests.open(work_id)
    admitted: Admission | None = None
    reply: bytes | None = None
    try:
        # The images' bytes are held against the memory budget until Redis counts them itself.
        async with state.memory.reserve(await state.memory.need(model, images), "request"):
            admitted = await state.ledger.admit(model, work_id, len(images), deadline)
            refs = await stash_images(state, exchange.blobs_key, images, ttl_s=int(timeout) + 60)
        payload = EmbedPayload(request_id=request_id, model=model, items=refs, reply_key=exchange.reply_key, deadline=deadline)
        await publish(state, EMBED_TASK, [payload.model_dump()])
        reply = await _wait_for_reply(state, exchange, payload, client_gone)
    finally:
        # Shielded: a cancelled request (its client left) must still withdraw and leave the ledger.
        # A request refused before it entered the ledger was never queued: nothing to withdraw.
        await asyncio.shield(_finish(state, key_id, work_id, admitted, admitted is not None and reply is None, exchange, timeout))
    if reply is None:
        raise ApiError(ErrorCode.TIMEOUT, f"no worker answered within {timeout:g} s; the request was withdrawn")
    return [ItemResult.model_validate(item) for item in orjson.loads(reply)]


async def _finish(state: AppState, key_id: str, work_id: str, admitted: Admission | None, withdrawn: bool, exchange: SyncRequest, timeout: float) -> None:
    """Withdraw the request if it had no answer, and release what it held (``admitted`` is None
    when it was refused before it entered the ledger)."""
    try:
        if withdrawn:
            # Workers skip a withdrawn request at task start and drop its images from batches; the
            # ledger is released even when a full Redis refused the flag.
            await state.requests.withdraw(exchange, ttl_s=int(timeout) + 60)
        if admitted is not None:
            await state.ledger.release(admitted)
        await state.quotas.release(key_id, work_id)
    except Exception as exc:  # Redis went away: ledger and quota entries expire at the deadline by themselves
        log.warning("could not withdraw a request", extra={"error": type(exc).__name__})


async def _wait_for_reply(state: AppState, exchange: SyncRequest, payload: EmbedPayload, client_gone: Callable[[], Awaitable[None]]) -> bytes | None:
    """The reply, or None at the deadline; raises ClientGone when the client disconnects.

    The wait is cut into slices: between slices the API checks that the worker that started the
    request still heartbeats, and sends the request again if it does not, so a dead or frozen
    worker costs the heartbeat TTL rather than the broker's much longer visibility timeout. When no
    worker serves the model any more, the wait ends at once with 503.
    """
    gone = asyncio.ensure_future(client_gone())
    redispatched = 0
    try:
        while (remaining := payload.deadline - time.time()) > 0:
            pop = asyncio.ensure_future(state.requests.next_reply(exchange, min(state.wait_slice_s, remaining)))
            await asyncio.wait({pop, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not pop.done():
                pop.cancel()
                raise ClientGone
            reply = pop.result()
            if reply is not None:
                return reply
            holder = await state.claims.holder_state(payload.reply_key, payload.model)
            if holder == HolderState.NO_WORKER:
                # Waiting on could only end in 504; a worker that comes back later finds it withdrawn.
                raise ApiError(
                    ErrorCode.MODEL_NOT_SERVED,
                    f"no worker is serving model {payload.model!r} any more; retry later",
                    param="model",
                    headers={"Retry-After": "5"},
                )
            if holder == HolderState.HOLDER_LOST and redispatched < MAX_REDISPATCHES:
                redispatched += 1
                log.warning(
                    "the worker holding a request stopped heartbeating; sending the request again", extra={"model": payload.model, "attempt": redispatched + 1}
                )
                await publish(state, EMBED_TASK, [payload.model_dump()])
        return None
    finally:
        gone.cancel()
