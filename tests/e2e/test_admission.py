"""The admission of a synchronous request (one script, ``shared.store.admission``) on a real Redis.

When several refusals apply, the first in the order the API has always checked them answers: no
live worker (503), more images than the key may ever queue (400), the key's quota full (429), Redis's
memory budget (507), more images than the timeout covers (400), too many requests waiting (429), the
expected wait (429). A refused request leaves nothing in Redis; an admitted small one has its bytes
and its task stored by the same script, and its release leaves nothing behind either.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis
import redis.asyncio

from api import request_groups
from api.admission import Admission, RequestAdmission
from api.errors import ApiError
from api.inputs import ParsedInput
from api.memory_budget import MemoryBudget
from api.publisher import TaskPublisher
from api.quotas import TenantQuota
from api.request_groups import RequestGroups
from api.sync_requests import next_reply
from devtools.redis_server import RedisServer
from shared.celery_app import create_celery_app
from shared.errors import ErrorCode
from shared.protocol import EmbedPayload, ModelInfo
from shared.queues import queue_for
from shared.settings import Settings
from shared.store.admission import AdmissionStore, LedgerKeys, QueuedTask, RequestAsk
from shared.store.registry import ModelRegistry, WorkerRegistry
from shared.store.requests import RequestExchange, RequestReplies
from shared.store.tenants import TenantKeys, TenantLedger
from tests.support.stack import running_redis

PREFIX = "imb:"
MODEL = "test/model"
KEY = "tenant-a"
OTHER_KEY = "tenant-b"
KEY_LIMIT = 4
QUEUE = "test-queue"
IMAGE = b"\xff\xd8 jpeg bytes \xff\xd9"
INFO = ModelInfo(
    id=MODEL, dim=8, patch_size=14, image_size=(28, 28), num_register_tokens=0, tokens_per_image=5, model_type="dinov2", dtype="float32", device="cpu"
)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis") as started:
        yield started


class Api:
    """The API's admission objects, as ``api.state`` wires them, on one asyncio client."""

    def __init__(self, client: redis.asyncio.Redis, timeout_s: float = 10.0, max_requests: int = 10, budget_bytes: int | None = 2**40) -> None:
        registry = ModelRegistry(client, PREFIX)
        self.memory = MemoryBudget(client, registry, budget_bytes)
        self.quota = TenantQuota(TenantLedger(client, PREFIX), KEY_LIMIT, registry)
        self.admission = RequestAdmission(AdmissionStore(client, PREFIX), self.quota, self.memory, timeout_s, max_requests)
        self.requests = RequestExchange(client, client, PREFIX)

    async def request(self, images: int, key: str = KEY, store_bytes: bool = True) -> RequestAsk:
        work_id = uuid.uuid4().hex
        blobs_key = self.requests.open(work_id).blobs_key
        need = await self.memory.need(MODEL, [ParsedInput(index=index, data=IMAGE) for index in range(images)])
        stored = [(index, IMAGE) for index in range(images)] if store_bytes else []
        return RequestAsk(key, work_id, images, time.time() + 10, need, 0, blobs_key, stored)

    async def ask(self, images: int, key: str = KEY, store_task: bool = True) -> Admission:
        ask = await self.request(images, key, store_task)
        return await self.admission.admit_one(MODEL, ask, QueuedTask(QUEUE, f"task of {ask.work_id}".encode()) if store_task else None)

    async def refusal(self, images: int, key: str = KEY) -> ApiError:
        try:
            await self.ask(images, key)
        except ApiError as refused:
            return refused
        raise AssertionError(f"{images} images of {key} were admitted")


def _state(store: redis.Redis) -> dict[str, object]:
    """What admissions leave in Redis: image bytes, queued tasks, the ledger and the keys' quotas."""
    ledger = LedgerKeys(PREFIX)
    tenants = TenantKeys(PREFIX)
    return {
        "blobs": len(list(store.scan_iter(match=f"{PREFIX}blobs:*"))),
        "queued": store.llen(QUEUE),
        "ledger": store.zcard(ledger.admitted(MODEL)),
        "ledger images": int(store.hget(ledger.admitted_images(MODEL), "total") or 0),
        "quota": {key: int(store.hget(tenants.images(key), "total") or 0) for key in (KEY, OTHER_KEY)},
    }


def _answer(refused: ApiError) -> tuple[ErrorCode, int, dict[str, str] | None]:
    return refused.code, refused.status, refused.headers


@asynccontextmanager
async def _connected(url: str) -> AsyncIterator[tuple[redis.Redis, redis.asyncio.Redis]]:
    """A synchronous client to look at Redis with, and an asyncio client for the API's side."""
    store = redis.Redis.from_url(url)
    client = redis.asyncio.Redis.from_url(url)
    try:
        yield store, client
    finally:
        await client.aclose()
        store.close()


def test_the_first_refusal_that_applies_answers_and_a_refusal_leaves_nothing(server: RedisServer) -> None:
    asyncio.run(_scenario(server.url))


async def _scenario(url: str) -> None:
    async with _connected(url) as (store, client):
        api = Api(client)
        empty = _state(store)

        # No worker yet: 503, although the request is also over the key's limit.
        refused = await api.refusal(KEY_LIMIT + 1)
        assert _answer(refused) == (ErrorCode.MODEL_NOT_SERVED, 503, {"Retry-After": "5"}) and refused.param == "model"
        assert refused.message == f"no worker is serving model {MODEL!r} right now; retry later"

        # A worker measured 2 s per image. The request alone is over the key's limit: 400.
        WorkerRegistry(store, PREFIX).beat("worker@host", [INFO], ttl_s=60, seconds_per_image={MODEL: 2.0})
        refused = await api.refusal(KEY_LIMIT + 1)
        assert _answer(refused) == (ErrorCode.EXCEEDS_KEY_QUOTA, 400, None) and refused.param == "input"
        assert refused.message.startswith(f"{KEY_LIMIT + 1} images are more than this API key may have queued at once ({KEY_LIMIT})")

        # The key has a job of 3 images in flight: 2 more do not fit (429, room back in (3 + 2 - 4) x 2 s),
        # even with Redis's memory budget (1 byte) exceeded too.
        jobs = TenantLedger(client, PREFIX)
        await jobs.admit(KEY, "job_1", 3, KEY_LIMIT, time.time() + 60)
        for budget in (2**40, 1):
            refused = await Api(client, budget_bytes=budget).refusal(2)
            assert _answer(refused) == (ErrorCode.KEY_QUOTA_EXCEEDED, 429, {"Retry-After": "2"})
            assert refused.message.startswith("this API key has 3 images queued or in progress; 2 more would exceed its limit of 4")
        await jobs.release(KEY, "job_1")

        # The memory budget is next: 507 naming it, although 3 images at 2 s also exceed a 5 s timeout.
        refused = await Api(client, timeout_s=5.0, budget_bytes=1).refusal(3)
        assert _answer(refused) == (ErrorCode.REDIS_FULL, 507, {"Retry-After": "10"})
        assert "Redis has no room for this request" in refused.message and "(IMBEDDINGS_REDIS_MAX_BYTES)" in refused.message

        # Then more images than the timeout covers: 400, pointing to jobs.
        refused = await Api(client, timeout_s=5.0).refusal(3)
        assert _answer(refused) == (ErrorCode.REQUEST_EXCEEDS_TIMEOUT, 400, None) and "POST /v1/jobs" in refused.message
        assert refused.message.startswith("3 images need about 6 s of the model's time, more than the request timeout of 5 s")
        assert _state(store) == empty

        # Two requests of another key wait, 2 images ahead. With room for two requests, a third is refused
        # with a Retry-After of its own images' time; the timeout check still comes first.
        waiting = [await api.ask(1, OTHER_KEY) for _ in range(2)]
        refused = await Api(client, timeout_s=5.0, max_requests=2).refusal(3)
        assert refused.code == ErrorCode.REQUEST_EXCEEDS_TIMEOUT
        refused = await Api(client, max_requests=2).refusal(1)
        assert _answer(refused) == (ErrorCode.QUEUE_FULL, 429, {"Retry-After": "2"})
        assert refused.message == f"model {MODEL!r} has 2 requests waiting (limit 2); retry later"

        # With more room, 3 images after the 2 ahead would wait (2 + 3) x 2 = 10 s, over a 9 s timeout: 429.
        refused = await Api(client, timeout_s=9.0).refusal(3)
        assert _answer(refused) == (ErrorCode.QUEUE_FULL, 429, {"Retry-After": "1"})
        assert refused.message.startswith(f"model {MODEL!r} is busy: this request would wait about 10 s, longer than the request timeout of 9 s")

        # Every refusal left Redis as it was: only the two admitted requests are there.
        assert _state(store) == {**empty, "blobs": 2, "queued": 2, "ledger": 2, "ledger images": 2, "quota": {KEY: 0, OTHER_KEY: 2}}

        # Admitted: the bytes and the task are stored with the admission.
        admitted = await api.ask(3)
        blobs = api.requests.open(admitted.work_id).blobs_key
        assert store.hgetall(blobs) == {str(index).encode(): IMAGE for index in range(3)} and 0 < store.ttl(blobs) <= 70
        assert store.lindex(QUEUE, 0) == f"task of {admitted.work_id}".encode()
        assert _state(store)["quota"] == {KEY: 3, OTHER_KEY: 2}

        # Without store_task, the admission stores neither (a large request's follow in a transaction).
        alone = await Api(client, timeout_s=60.0).ask(1, OTHER_KEY, store_task=False)
        assert not store.exists(api.requests.open(alone.work_id).blobs_key) and store.llen(QUEUE) == 3

        # Released (one twice: the second release changes nothing), nothing is left in the ledger or the quotas.
        for held in [*waiting, admitted, alone, admitted]:
            await api.admission.release(held)
        released = _state(store)
        assert (released["ledger"], released["ledger images"], released["quota"]) == (0, 0, {KEY: 0, OTHER_KEY: 0})
        assert not store.exists(TenantKeys(PREFIX).images(KEY)) and not store.exists(TenantKeys(PREFIX).work(KEY))


def test_requests_admitted_together_are_weighed_in_order_and_share_one_task(server: RedisServer) -> None:
    """A round of requests (``api.request_groups``) is one script: each request sees those before it,
    a refused one changes nothing, and the round's task is queued only when all were admitted."""
    asyncio.run(_round_scenario(server.url))


async def _round_scenario(url: str) -> None:
    async with _connected(url) as (store, client):
        api = Api(client)
        WorkerRegistry(store, PREFIX).beat("worker@host", [INFO], ttl_s=60, seconds_per_image={MODEL: 0.1})
        empty = _state(store)

        # The key's limit is 4: 2 + 2 fit, the third request of 1 no longer does; the other key's does.
        asks = [await api.request(2), await api.request(2), await api.request(1), await api.request(1, OTHER_KEY)]
        outcomes, queued = await api.admission.admit(MODEL, asks, QueuedTask(QUEUE, b"the round's task"))
        assert [type(outcome) for outcome in outcomes] == [Admission, Admission, ApiError, Admission] and not queued
        refused = outcomes[2]
        assert isinstance(refused, ApiError) and refused.code == ErrorCode.KEY_QUOTA_EXCEEDED
        assert refused.message.startswith("this API key has 4 images queued or in progress; 1 more would exceed its limit of 4")
        stored = {ask.work_id: store.hlen(ask.blobs_key) for ask in asks}
        assert stored == {asks[0].work_id: 2, asks[1].work_id: 2, asks[2].work_id: 0, asks[3].work_id: 1}
        assert _state(store) == {**empty, "blobs": 3, "ledger": 3, "ledger images": 5, "quota": {KEY: 4, OTHER_KEY: 1}}
        for outcome in outcomes:
            if isinstance(outcome, Admission):
                await api.admission.release(outcome)

        # All admitted: the task goes with them, once.
        asks = [await api.request(1), await api.request(1, OTHER_KEY)]
        outcomes, queued = await api.admission.admit(MODEL, asks, QueuedTask(QUEUE, b"the round's task"))
        assert all(isinstance(outcome, Admission) for outcome in outcomes) and queued
        assert store.lrange(QUEUE, 0, -1) == [b"the round's task"]


def test_requests_that_arrive_together_go_in_rounds_of_one_batch_and_one_task(server: RedisServer) -> None:
    """The API's rounds (``api.request_groups``) on a real Redis: requests that reach admission in one
    turn of the event loop share a round, a round holds at most one batch of images, a refused
    request's round still queues the others' task, and each request gets its own answer."""
    asyncio.run(_groups_scenario(server.url))


async def _groups_scenario(url: str) -> None:
    settings = Settings(redis_url=url)
    celery = create_celery_app(settings)
    async with _connected(url) as (store, client):
        api = Api(client, max_requests=64)
        WorkerRegistry(store, PREFIX).beat("worker@host", [INFO], ttl_s=60, seconds_per_image={MODEL: 0.1})
        groups = RequestGroups(api.admission, TaskPublisher(celery, client), round_images=8)
        queue = queue_for(MODEL, "interactive")

        def admit(ask: RequestAsk) -> asyncio.Future[Admission]:
            return asyncio.ensure_future(groups.admit(MODEL, ask, {"request_id": ask.work_id, "model": MODEL}, api.admission.release))

        async def requests(sizes: list[tuple[int, str]]) -> list[Admission | BaseException]:
            asks = [await api.request(images, key) for images, key in sizes]
            # All reach admission in the same turn of the event loop, as concurrent requests do.
            return await asyncio.gather(*[admit(ask) for ask in asks], return_exceptions=True)

        def tasks() -> list[list[str]]:
            """The request ids of each task queued, oldest first."""
            messages = [json.loads(raw) for raw in reversed(store.lrange(queue, 0, -1))]
            store.delete(queue)
            return [[request["request_id"] for request in json.loads(base64.b64decode(m["body"]))[1]["payload"]["requests"]] for m in messages]

        # Ten one-image requests of two keys (each key may hold 4 images): two rounds, of 8 and 2 images.
        admitted = await requests([(1, KEY if n < 4 else OTHER_KEY) for n in range(4)] + [(1, f"tenant-{n}") for n in range(6)])
        assert all(isinstance(outcome, Admission) for outcome in admitted)
        assert [len(task) for task in tasks()] == [8, 2]

        # A round in which the key's third request does not fit: the others' task is queued without it.
        for outcome in admitted:
            assert isinstance(outcome, Admission)
            await api.admission.release(outcome)
        outcomes = await requests([(2, KEY), (2, KEY), (1, KEY), (1, OTHER_KEY)])
        refused = outcomes[2]
        assert isinstance(refused, ApiError) and refused.code == ErrorCode.KEY_QUOTA_EXCEEDED
        kept = [outcome.work_id for outcome in outcomes if isinstance(outcome, Admission)]
        assert len(kept) == 3 and tasks() == [kept]
        for outcome, images in zip(admitted + outcomes, [1] * 10 + [2, 2, 1, 1]):
            if isinstance(outcome, Admission):
                groups.settled(MODEL, images)
                await api.admission.release(outcome)

        # Two batches of this process's images admitted and unanswered: the workers have its work
        # queued, so a round that would queue behind it waits to fill, until answers bring that
        # below two batches.
        busy = await requests([(1, f"tenant-{n}") for n in range(16)])
        assert all(isinstance(outcome, Admission) for outcome in busy)
        assert [len(task) for task in tasks()] == [8, 8]
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(request_groups, "ROUND_HOLD_S", 3600.0)
            held = admit(await api.request(1, OTHER_KEY))
            for _ in range(10):
                await asyncio.sleep(0)
            assert not held.done() and tasks() == []
            groups.settled(MODEL, 1)  # one answer: 15 images unanswered
            assert isinstance(await held, Admission) and len(tasks()) == 1
        # At most ROUND_HOLD_S: a round held while the workers stay busy goes when its hold is over.
        late = admit(await api.request(1, OTHER_KEY))
        assert isinstance(await late, Admission) and len(tasks()) == 1
    celery.close()


def test_the_reply_is_taken_with_the_release_and_only_when_it_came(server: RedisServer) -> None:
    """The wait for a reply and the release share a round trip: a wait that sees no reply releases
    nothing; the reply, pushed by the worker's own code, is taken with the release; so it is after
    Redis lost its scripts."""
    asyncio.run(_reply_scenario(server.url))


async def _reply_scenario(url: str) -> None:
    async with _connected(url) as (store, client):
        api = Api(client)
        WorkerRegistry(store, PREFIX).beat("worker@host", [INFO], ttl_s=60, seconds_per_image={MODEL: 0.1})
        replies = RequestReplies(store, PREFIX, reply_ttl_s=70)
        for lost_scripts in (False, True):
            admitted = await api.ask(2)
            exchange = api.requests.open(admitted.work_id)
            payload = EmbedPayload(request_id="r", model=MODEL, items=[], reply_key=exchange.reply_key, deadline=time.time() + 10)
            assert await next_reply(api.requests, api.admission, admitted, exchange, 0.2) is None
            assert _state(store)["quota"] == {KEY: 2, OTHER_KEY: 0}  # no reply yet: still held

            assert replies.push([(payload, '[{"index": 0}]')]) == [True]
            if lost_scripts:
                store.script_flush()
            assert await next_reply(api.requests, api.admission, admitted, exchange, 0.2) == b'[{"index": 0}]'
            taken = _state(store)
            assert (taken["ledger"], taken["ledger images"], taken["quota"]) == (0, 0, {KEY: 0, OTHER_KEY: 0}), lost_scripts
            assert not store.exists(exchange.reply_key)
            store.delete(QUEUE, exchange.blobs_key)
