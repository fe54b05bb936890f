"""Where finished work goes: the reply list a waiting request blocks on, or a job's result hash."""

from __future__ import annotations

import json

from redis import Redis
from redis.exceptions import OutOfMemoryError

from shared.keys import Keys
from shared.protocol import EmbedPayload, ItemResult, JobChunkPayload
from shared.store.jobs import MARK_RUNNING, STORE_RESULTS, store_results_args
from shared.store.requests import RequestReplies
from worker.tickets import Ticket


def dump_results(results: list[ItemResult]) -> str:
    return json.dumps([result.model_dump(exclude_none=True) for result in results])


class ResultStore:
    def __init__(self, redis: Redis, keys: Keys, reply_ttl_s: int, job_ttl_s: int) -> None:
        self._redis = redis
        self._keys = keys
        self._replies = RequestReplies(redis, keys.prefix, reply_ttl_s)
        self._job_ttl_s = job_ttl_s
        self._store_results = redis.register_script(STORE_RESULTS)
        self._mark_running = redis.register_script(MARK_RUNNING)

    def is_abandoned(self, reply_key: str) -> bool:
        return self._replies.abandoned(reply_key)

    def mark_withdrawn(self, tickets: list[Ticket]) -> None:
        """Flag the tickets whose request the API has withdrawn (one round trip for them all)."""
        asked = [ticket for ticket in tickets if ticket.reply_key is not None]
        for ticket, abandoned in zip(asked, self._replies.abandoned_among([ticket.reply_key for ticket in asked])):
            if abandoned:
                ticket.withdrawn = True

    def job_withdrawn(self, job_id: str) -> bool:
        """The job was cancelled, or expired: its chunks' remaining work is for nobody."""
        return self._redis.hget(self._keys.job(job_id), "status") in (None, b"cancelled")

    def reply(self, payload: EmbedPayload, results: list[ItemResult]) -> bool:
        """Push the results for the waiting request; False when it had stopped waiting (discarded)."""
        return self._replies.push(payload, dump_results(results))

    def start_chunk(self, chunk: JobChunkPayload) -> tuple[str, set[int]]:
        """The job's status, and which of the chunk's items already have a stored result.

        A redelivered chunk (its worker died after storing, before acknowledging) skips those.
        """
        try:
            status = self._mark_running(keys=[self._keys.job(chunk.job_id), self._keys.job_counts()]).decode()
        except OutOfMemoryError:
            # Redis is full: the job turns running when its first results are stored (which frees
            # image bytes), and refusing the chunk here would leave nothing able to free memory.
            status = (self._redis.hget(self._keys.job(chunk.job_id), "status") or b"gone").decode()
        indices = [ref.index for ref in chunk.items]
        stored = self._redis.hmget(self._keys.job_results(chunk.job_id), [str(i) for i in indices])
        return status, {index for index, value in zip(indices, stored) if value is not None}

    def store_chunk(self, chunk: JobChunkPayload, results: list[ItemResult], now: int) -> str:
        """Drop the items' image bytes and record each item once (counted once), in one script;
        returns the job status. Raises OutOfMemoryError when Redis is full and the chunk had no
        image bytes to drop."""
        args = store_results_args(self._job_ttl_s, now, results)
        keys = [self._keys.job(chunk.job_id), self._keys.job_results(chunk.job_id), self._keys.job_counts(), self._keys.tenant_work(chunk.owner), self._keys.tenant_images(chunk.owner)]
        if any(ref.kind == "blob" for ref in chunk.items):
            keys.append(self._keys.job_blobs(chunk.job_id))
        return self._store_results(keys=keys, args=args)[3].decode()

    def drop_blobs(self, chunk: JobChunkPayload) -> None:
        fields = [str(ref.index) for ref in chunk.items if ref.kind == "blob"]
        if fields:
            self._redis.hdel(self._keys.job_blobs(chunk.job_id), *fields)
