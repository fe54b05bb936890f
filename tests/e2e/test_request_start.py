"""A worker's side of a synchronous request, against a real Redis: starting it claims it, sees whether
the API still waits for it and reads its image bytes (one pipeline for a task's requests); the batch-time lookup skips a
ticket looked up moments ago and asks again once that lookup is older."""

from __future__ import annotations

import time
import uuid

import redis

from devtools.redis_server import RedisServer
from shared.protocol import BlobRef, EmbedPayload, UrlRef
from shared.store.claims import ClaimKeys
from shared.store.requests import RequestKeys
from worker.result_store import ResultStore
from worker.tickets import LOOKUP_FRESH_S, Ticket


def _request(keys: RequestKeys, work: str) -> EmbedPayload:
    blobs = keys.blobs(work)
    items = [BlobRef(index=0, data=blobs), UrlRef(index=1, data="http://images.test/a.jpg"), BlobRef(index=2, data=blobs), BlobRef(index=3, data=blobs)]
    return EmbedPayload(request_id=work, model="m", items=items, reply_key=keys.reply(work), deadline=time.time() + 30)


def test_start_claims_each_request_and_reads_its_bytes_unless_withdrawn(redis_server: RedisServer) -> None:
    prefix = f"test-{uuid.uuid4().hex}:"
    client = redis.Redis.from_url(redis_server.url)
    store, keys = ResultStore(client, prefix, reply_ttl_s=60, job_ttl_s=60), RequestKeys(prefix)
    wanted, withdrawn = _request(keys, "wanted"), _request(keys, "withdrawn")
    for payload in (wanted, withdrawn):
        client.hset(keys.blobs(payload.request_id), mapping={"0": b"first", "2": b"third"})  # index 3 expired
    client.set(keys.abandoned(withdrawn.reply_key), b"1")

    started, skipped = store.start([wanted, withdrawn], "worker-a")
    assert started is not None and started.image_bytes() == [b"first", b"third", None]
    assert skipped is None
    for payload in (wanted, withdrawn):
        assert client.get(ClaimKeys(prefix).claim(payload.reply_key)) == b"worker-a"
        assert 0 < client.ttl(ClaimKeys(prefix).claim(payload.reply_key)) <= 36
    [alone] = store.start([wanted], "worker-b")
    assert alone is not None and alone.image_bytes() == [b"first", b"third", None]


def test_a_ticket_looked_up_moments_ago_is_not_looked_up_again_until_that_is_old(redis_server: RedisServer) -> None:
    prefix = f"test-{uuid.uuid4().hex}:"
    client = redis.Redis.from_url(redis_server.url)
    store, keys = ResultStore(client, prefix, reply_ttl_s=60, job_ttl_s=60), RequestKeys(prefix)
    payload = _request(keys, "left")
    ticket = Ticket(payload.reply_key, payload.deadline, looked_up_at=time.monotonic())
    client.set(keys.abandoned(payload.reply_key), b"1")  # the client left just after the task started
    store.mark_withdrawn([ticket])
    assert not ticket.withdrawn
    time.sleep(LOOKUP_FRESH_S)
    store.mark_withdrawn([ticket])
    assert ticket.withdrawn and not ticket.wanted()
