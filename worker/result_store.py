"""Where finished work goes: the reply list a waiting request blocks on, or a job's result hash."""

from __future__ import annotations

import json

from redis import Redis

from shared.jobs import MARK_RUNNING, STORE_RESULTS, store_results_args
from shared.keys import Keys
from shared.protocol import EmbedPayload, ItemResult, JobChunkPayload


def dump_results(results: list[ItemResult]) -> str:
    return json.dumps([result.model_dump(exclude_none=True) for result in results])


class ResultStore:
    def __init__(self, redis: Redis, keys: Keys, reply_ttl_s: int, job_ttl_s: int) -> None:
        self._redis = redis
        self._keys = keys
        self._reply_ttl_s = reply_ttl_s
        self._job_ttl_s = job_ttl_s
        self._store_results = redis.register_script(STORE_RESULTS)
        self._mark_running = redis.register_script(MARK_RUNNING)

    def is_abandoned(self, reply_key: str) -> bool:
        return bool(self._redis.exists(self._keys.abandoned(reply_key)))

    def reply(self, payload: EmbedPayload, results: list[ItemResult]) -> bool:
        """Push the results for the waiting request; False when it had stopped waiting (discarded)."""
        blobs = {ref.data for ref in payload.items if ref.kind == "blob"}
        if self.is_abandoned(payload.reply_key):
            if blobs:
                self._redis.delete(*blobs)
            return False
        # Should the API give up between the check and the push, the expiry discards the answer.
        pipe = self._redis.pipeline(transaction=True)
        pipe.rpush(payload.reply_key, dump_results(results))
        pipe.expire(payload.reply_key, self._reply_ttl_s)
        if blobs:
            pipe.delete(*blobs)
        pipe.execute()
        return True

    def start_chunk(self, chunk: JobChunkPayload) -> tuple[str, set[int]]:
        """The job's status, and which of the chunk's items already have a stored result.

        A redelivered chunk (its worker died after storing, before acknowledging) skips those.
        """
        status = self._mark_running(keys=[self._keys.job(chunk.job_id), self._keys.job_counts()]).decode()
        indices = [ref.index for ref in chunk.items]
        stored = self._redis.hmget(self._keys.job_results(chunk.job_id), [str(i) for i in indices])
        return status, {index for index, value in zip(indices, stored) if value is not None}

    def store_chunk(self, chunk: JobChunkPayload, results: list[ItemResult], now: int) -> str:
        """Record each item once (counted once) and drop the chunk's image bytes; returns the job status."""
        args = store_results_args(self._job_ttl_s, now, results)
        keys = [self._keys.job(chunk.job_id), self._keys.job_results(chunk.job_id), self._keys.job_counts(), self._keys.tenant_work(chunk.owner), self._keys.tenant_images(chunk.owner)]
        status = self._store_results(keys=keys, args=args)[3].decode()
        self.drop_blobs(chunk)
        return status

    def drop_blobs(self, chunk: JobChunkPayload) -> None:
        fields = [str(ref.index) for ref in chunk.items if ref.kind == "blob"]
        if fields:
            self._redis.hdel(self._keys.job_blobs(chunk.job_id), *fields)
