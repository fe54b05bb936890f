"""Where finished work goes: the reply list a waiting request blocks on, or a job's result hash."""

from __future__ import annotations

import json

from redis import Redis

from shared.keys import Keys
from shared.protocol import EmbedPayload, ItemResult, JobChunkPayload
from shared.store.jobs import JobStore
from worker.tickets import Ticket

# KEYS: reply list, the request's "abandoned" flag, then its image-bytes hashes. ARGV: results JSON,
# ttl seconds. Returns 1 when pushed, 0 when the API had stopped waiting. The image bytes go first:
# a full Redis then lets the (smaller) answer in (see STORE_RESULTS in shared.store.jobs).
REPLY = """
if #KEYS > 2 then
  redis.call('DEL', unpack(KEYS, 3))
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""


def dump_results(results: list[ItemResult]) -> str:
    return json.dumps([result.model_dump(exclude_none=True) for result in results])


class ResultStore:
    def __init__(self, redis: Redis, keys: Keys, reply_ttl_s: int, job_ttl_s: int) -> None:
        self._redis = redis
        self._keys = keys
        self._reply_ttl_s = reply_ttl_s
        self._jobs = JobStore(redis, keys.prefix, job_ttl_s)
        self._reply = redis.register_script(REPLY)

    def is_abandoned(self, reply_key: str) -> bool:
        return bool(self._redis.exists(self._keys.abandoned(reply_key)))

    def mark_withdrawn(self, tickets: list[Ticket]) -> None:
        """Flag the tickets whose request the API has withdrawn (one round trip for them all)."""
        asked = [ticket for ticket in tickets if ticket.reply_key is not None]
        flags = self._redis.mget([self._keys.abandoned(ticket.reply_key) for ticket in asked])
        for ticket, flag in zip(asked, flags):
            if flag is not None:
                ticket.withdrawn = True

    def job_withdrawn(self, job_id: str) -> bool:
        """The job was cancelled, or expired: its chunks' remaining work is for nobody."""
        return self._jobs.status(job_id) in (None, "cancelled")

    def reply(self, payload: EmbedPayload, results: list[ItemResult]) -> bool:
        """Push the results for the waiting request; False when it had stopped waiting (discarded)."""
        blobs = sorted({ref.data for ref in payload.items if ref.kind == "blob"})
        keys = [payload.reply_key, self._keys.abandoned(payload.reply_key), *blobs]
        return bool(self._reply(keys=keys, args=[dump_results(results), self._reply_ttl_s]))

    def start_chunk(self, chunk: JobChunkPayload) -> tuple[str, set[int]]:
        """The job's status, and which of the chunk's items already have a stored result.

        A redelivered chunk (its worker died after storing, before acknowledging) skips those.
        """
        return self._jobs.start(chunk.job_id, [ref.index for ref in chunk.items])

    def store_chunk(self, chunk: JobChunkPayload, results: list[ItemResult], now: int) -> str:
        """Drop the items' image bytes and record each item once (counted once), in one script;
        returns the job status. Raises OutOfMemoryError when Redis is full and the chunk had no
        image bytes to drop."""
        return self._jobs.store_results(chunk.job_id, chunk.owner, results, now, drop_blobs=any(ref.kind == "blob" for ref in chunk.items))

    def drop_blobs(self, chunk: JobChunkPayload) -> None:
        self._jobs.drop_blobs(chunk.job_id, [ref.index for ref in chunk.items if ref.kind == "blob"])
