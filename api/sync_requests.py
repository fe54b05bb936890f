"""Hand work to the workers through Celery and wait for the answer in Redis."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial

import orjson
from redis.exceptions import NoScriptError

from api.admission import Admission, RequestAdmission
from api.errors import ApiError
from api.inputs import ParsedInput
from api.state import AppState
from shared.errors import ErrorCode
from shared.protocol import BlobRef, EmbedPayload, ImageRef, ItemResult, UrlRef
from shared.queues import EMBED_TASK, queue_depth
from shared.store.admission import QueuedTask, RequestAsk
from shared.store.claims import HolderState
from shared.store.requests import RequestExchange, SyncRequest, store_image_bytes

log = logging.getLogger(__name__)

# A request whose images total at most this many bytes is stored and queued by its admission script,
# in the same round trip; larger ones follow in a transaction of their own, so that megabytes of
# image bytes are not copied once more into Redis's Lua interpreter and kept there until its next
# garbage collection.
INLINE_TASK_BYTES = 64 * 1024
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
    await store_image_bytes(state.redis, blobs_key, ((image.index, image.data) for image in images if image.data is not None), ttl_s)
    return _refs(blobs_key, images)


async def publish(state: AppState, name: str, payloads: list[dict[str, object]]) -> None:
    """Send Celery tasks, routed to the model's queue."""
    await state.tasks.publish(name, payloads)


class ClientGone(Exception):
    """The client closed its connection while its request waited."""


async def embed_and_wait(
    state: AppState, key_id: str, model: str, images: list[ParsedInput], request_id: str, client_gone: Callable[[], Awaitable[None]]
) -> list[ItemResult]:
    """Admit the request, enqueue its images and wait for their results until the request's
    deadline; they count against the key's quota until then.

    Two round trips to Redis: the admission script, which also stores the images' bytes and queues
    the task of a small request (a larger one's follow in one transaction, so a full Redis cannot
    take the task without its bytes), and the wait, whose reply is taken with the request's release.
    Small requests of image bytes share the admission's round trip and their task with the requests
    that arrive at the same time (``api.request_groups``).
    However the wait ends without an answer (deadline, client gone, an error), the request is
    withdrawn, so no worker computes it. ``client_gone()`` completes when the client disconnects.
    """
    timeout = state.settings.request_timeout_s
    deadline = time.time() + timeout
    # Keys are per dispatch, not per request id: clients choose X-Request-ID and may reuse it.
    work_id = uuid.uuid4().hex
    exchange = state.requests.open(work_id)
    blobs = [(image.index, image.data) for image in images if image.data is not None]
    payload = EmbedPayload(request_id=request_id, model=model, items=_refs(exchange.blobs_key, images), reply_key=exchange.reply_key, deadline=deadline)
    inline = sum(len(data) for _, data in blobs) <= INLINE_TASK_BYTES
    grouped = inline and len(blobs) == len(images)
    admitted: Admission | None = None
    reply: bytes | None = None
    need = await state.memory.need(model, images)
    try:
        # The images' bytes are held against the memory budget until Redis counts them itself.
        with state.memory.hold(need) as others_in_flight:
            ask = RequestAsk(key_id, work_id, len(images), deadline, need, others_in_flight, exchange.blobs_key, blobs if inline else [])
            if grouped:
                # Small and all bytes: admitted in a round with the other requests that come meanwhile, in one task.
                admitted = await state.request_groups.admit(model, ask, payload.model_dump(), partial(_withdraw, state, exchange=exchange))
            elif inline:  # URLs: its own task, which a worker starts fetching at once
                admitted = await state.admission.admit_one(model, ask, QueuedTask(*state.tasks.message(EMBED_TASK, payload.model_dump())))
            else:
                admitted = await state.admission.admit_one(model, ask, None)
                queue, message = state.tasks.message(EMBED_TASK, payload.model_dump())
                send = state.redis.pipeline(transaction=True)
                state.requests.stash(send, exchange, blobs, state.admission.ttl_s)
                state.tasks.push(send, queue, message)
                await send.execute()
        reply = await _wait_for_reply(state, admitted, exchange, payload, client_gone)
    finally:
        # An answered request was released with its reply. Shielded: a cancelled request (its client
        # left) must still withdraw and release what it held. A request refused at admission holds nothing.
        if admitted is not None and grouped:
            state.request_groups.settled(model, len(images))
        if admitted is not None and reply is None:
            await asyncio.shield(_withdraw(state, admitted, exchange))
    if reply is None:
        raise ApiError(ErrorCode.TIMEOUT, f"no worker answered within {timeout:g} s; the request was withdrawn")
    return [ItemResult.model_validate(item) for item in orjson.loads(reply)]


def _refs(blobs_key: str, images: list[ParsedInput]) -> list[ImageRef]:
    """What crosses the queue for each image: its bytes' place in Redis, or its URL."""
    refs: list[ImageRef] = []
    for image in images:
        if image.data is not None:
            refs.append(BlobRef(index=image.index, blob_key=blobs_key))
        elif image.url is not None:
            refs.append(UrlRef(index=image.index, url=image.url))
    return refs


async def _withdraw(state: AppState, admitted: Admission, exchange: SyncRequest) -> None:
    """Withdraw a request that had no answer, and leave the ledger and the key's quota."""
    try:
        # Workers skip a withdrawn request at task start and drop its images from batches; the
        # ledger is released even when a full Redis refused the flag.
        await state.requests.withdraw(exchange, ttl_s=state.admission.ttl_s)
        await state.admission.release(admitted)
    except Exception as exc:  # Redis went away: ledger and quota entries expire at the deadline by themselves
        log.warning("could not withdraw a request", extra={"error": type(exc).__name__})


async def next_reply(requests: RequestExchange, admission: RequestAdmission, admitted: Admission, exchange: SyncRequest, timeout_s: float) -> bytes | None:
    """The reply, or None when none came within ``timeout_s``; a reply is taken together with the
    request's release, in the wait's round trip."""
    pipe = requests.waits()
    requests.queue_wait(pipe, exchange, timeout_s)
    admission.queue_take_reply(pipe, admitted, exchange.reply_key)
    try:
        _, reply = await pipe.execute()
    except NoScriptError:  # Redis lost its scripts (a restart): a reply the wait saw is still in its list
        reply = await admission.take_reply(admitted, exchange.reply_key)
    return reply


async def _wait_for_reply(
    state: AppState, admitted: Admission, exchange: SyncRequest, payload: EmbedPayload, client_gone: Callable[[], Awaitable[None]]
) -> bytes | None:
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
            pop = asyncio.ensure_future(next_reply(state.requests, state.admission, admitted, exchange, min(state.wait_slice_s, remaining)))
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
