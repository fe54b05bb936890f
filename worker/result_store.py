"""Where finished work goes: the reply list a waiting request blocks on, or a job's result hash."""

from __future__ import annotations

import json
import time

from redis import Redis

from shared.protocol import EmbedPayload, ItemResult, JobChunkPayload
from shared.store.jobs import JobStore
from shared.store.requests import RequestReplies, StartedRequest
from worker.tickets import Ticket


def dump_results(results: list[ItemResult]) -> str:
    return json.dumps([result.model_dump(exclude_none=True) for result in results])


class ResultStore:
    def __init__(self, redis: Redis, prefix: str, reply_ttl_s: int, job_ttl_s: int) -> None:
        self._jobs = JobStore(redis, prefix, job_ttl_s)
        self._replies = RequestReplies(redis, prefix, reply_ttl_s)

    def start(self, requests: list[EmbedPayload], worker_name: str) -> list[StartedRequest | None]:
        """Claim the requests and read their image bytes; None for one the API has stopped waiting for."""
        return self._replies.start(requests, worker_name)

    def is_abandoned(self, reply_key: str) -> bool:
        return self._replies.abandoned(reply_key)

    def mark_withdrawn(self, tickets: list[Ticket]) -> None:
        """Flag the tickets whose request the API has withdrawn (one round trip for them all; none
        for tickets looked up moments ago)."""
        asked = [ticket for ticket in tickets if ticket.reply_key is not None and ticket.lookup_due()]
        if not asked:
            return
        now = time.monotonic()
        for ticket, abandoned in zip(asked, self._replies.abandoned_among([ticket.reply_key for ticket in asked])):
            ticket.looked_up_at = now
            if abandoned:
                ticket.withdrawn = True

    def job_withdrawn(self, job_id: str) -> bool:
        """The job was cancelled, or expired: its chunks' remaining work is for nobody."""
        return self._jobs.status(job_id) in (None, "cancelled")

    def reply(self, answers: list[tuple[EmbedPayload, list[ItemResult]]]) -> list[bool | Exception]:
        """Push each request's results for its waiting client: True where pushed, False for one whose
        client had stopped waiting (discarded), or what Redis refused of its push."""
        return self._replies.push([(request, dump_results(results)) for request, results in answers])

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
