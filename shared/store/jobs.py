"""Async jobs in Redis: the one owner of ``job:<id>``, ``job:<id>:results``, ``job:<id>:blobs`` and
``job-counts`` (``JobKeys``), used by the API (``AsyncJobStore``) and the worker (``JobStore``).

Every state change is one Lua script, so it is atomic: an item's result is written at most once
(``HSETNX``) and counted only when it was, which makes duplicate deliveries of a chunk harmless, and
the job turns ``completed`` in the same step that accounts for its last item.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from typing import Literal

import redis.asyncio
from pydantic import BaseModel, Field
from redis import Redis
from redis.asyncio.client import Pipeline as AsyncPipeline
from redis.exceptions import OutOfMemoryError

from shared.protocol import ItemResult
from shared.store.tenants import QUOTA_FUNCTIONS, TenantKeys
from shared.vectors import EncodingFormat

JobStatus = Literal["queued", "running", "completed", "cancelled"]


class JobView(BaseModel):
    """What a client is shown of a job: the body of the ``/v1/jobs`` answers."""

    id: str
    object: Literal["embedding.job"] = "embedding.job"
    status: JobStatus
    model: str
    total: int
    completed: int
    failed: int
    created_at: int
    finished_at: int | None


class JobRecord(JobView):
    """The stored job: what clients see, plus how to present its results and whose it is."""

    completed: int = 0
    failed: int = 0
    finished_at: int | None = None

    encoding_format: EncodingFormat = "float"
    pooling: Literal["cls", "mean"] = "cls"
    dimensions: int | None = None
    results_deleted: bool = False
    owner: str = Field("", description="Id of the API key that created the job (never the key itself); '' without keys.")

    @classmethod
    def from_redis(cls, fields: dict[bytes, bytes]) -> JobRecord:
        values = {key.decode(): value.decode() for key, value in fields.items()}
        values = {key: value for key, value in values.items() if value != ""}
        return cls.model_validate(values)

    def to_redis(self) -> dict[str, str | int]:
        return {key: ("" if value is None else int(value) if isinstance(value, bool) else value) for key, value in self.model_dump(exclude={"object"}).items()}


JOB_ID = re.compile(r"job_[0-9a-f]{24}")


def new_job_id() -> str:
    """``job_`` + creation time (8 hex digits of seconds) + 16 hex digits of randomness: an expired
    id can be told from a wrong one. Anything else is not a job id (``JOB_ID``)."""
    return f"job_{int(time.time()):08x}{secrets.token_hex(8)}"


def is_job_id(text: str) -> bool:
    return JOB_ID.fullmatch(text) is not None


def job_created_at(job_id: str) -> int | None:
    return int(job_id[4:12], 16) if is_job_id(job_id) else None


@dataclass(frozen=True)
class JobKeys:
    prefix: str

    def job(self, job_id: str) -> str:
        """Hash: the job's record (``JobRecord`` fields)."""
        return f"{self.prefix}job:{job_id}"

    def results(self, job_id: str) -> str:
        """Hash: item index -> ItemResult JSON."""
        return f"{self.prefix}job:{job_id}:results"

    def blobs(self, job_id: str) -> str:
        """Hash: item index -> image bytes not yet embedded."""
        return f"{self.prefix}job:{job_id}:blobs"

    def counts(self) -> str:
        """Hash: job status -> number of jobs (queued/running now; completed/cancelled so far)."""
        return f"{self.prefix}job-counts"


# Every status change goes through set_status, which also keeps the service-wide job counts (a hash
# of status -> number of jobs, read by the API's /metrics) in step.
_SET_STATUS = """
local function set_status(job, counts, old, new)
  if old ~= new then
    redis.call('HSET', job, 'status', new)
    redis.call('HINCRBY', counts, old, -1)
    redis.call('HINCRBY', counts, new, 1)
  end
end
"""

# KEYS: job hash, job counts. ARGV: ttl seconds, then field/value pairs of the new job record.
CREATE = """
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[2], 'queued', 1)
"""

# KEYS: job hash, results hash, job counts, the owner's quota work and images (TenantKeys), and
# optionally the job's image-bytes hash. ARGV: ttl seconds, now, then triples (index, result json,
# "1" if error). Returns {completed, failed, total, status}; status "gone" when the job is unknown
# or cancelled. Items stored leave the owner's quota; a completed job leaves it altogether.
#
# The items' image bytes go first. Redis (noeviction) refuses a script's command that may grow memory
# while it is over maxmemory only until the script has written something: dropping the images first
# lets a chunk's results in when Redis is full, in exchange for the image bytes, which outweigh them.
# A chunk of URLs has no image bytes to drop: a full Redis refuses its results, and the worker
# hands the chunk back.
STORE_RESULTS = (
    _SET_STATUS
    + QUOTA_FUNCTIONS
    + """
if KEYS[6] then
  for i = 3, #ARGV, 3 do
    redis.call('HDEL', KEYS[6], ARGV[i])
  end
end
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status == 'cancelled' then
  return {0, 0, 0, 'gone'}
end
local ok, bad = 0, 0
for i = 3, #ARGV, 3 do
  if redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 1]) == 1 then
    if ARGV[i + 2] == '1' then bad = bad + 1 else ok = ok + 1 end
  end
end
local completed = redis.call('HINCRBY', KEYS[1], 'completed', ok)
local failed = redis.call('HINCRBY', KEYS[1], 'failed', bad)
local total = tonumber(redis.call('HGET', KEYS[1], 'total'))
local new = status
if new == 'queued' and completed + failed > 0 then
  new = 'running'
end
if completed + failed >= total then
  new = 'completed'
  local finished = redis.call('HGET', KEYS[1], 'finished_at')
  if not finished or finished == '' then
    redis.call('HSET', KEYS[1], 'finished_at', ARGV[2])
  end
end
set_status(KEYS[1], KEYS[3], status, new)
local job_id = redis.call('HGET', KEYS[1], 'id')
if new == 'completed' then
  quota_release(KEYS[4], KEYS[5], job_id)
else
  quota_settle(KEYS[4], KEYS[5], job_id, ok + bad, tonumber(ARGV[1]), tonumber(ARGV[2]))
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return {completed, failed, total, new}
"""
)

# KEYS: job hash, job counts. Marks a queued job running when a worker starts on it; returns the status.
MARK_RUNNING = (
    _SET_STATUS
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' then
  set_status(KEYS[1], KEYS[2], status, 'running')
  return 'running'
end
return status or 'gone'
"""
)

# KEYS: job hash, results hash, blobs hash, job counts, the owner's quota work and images. ARGV:
# now, the caller's key id. Cancels what has not run, drops stored results and image bytes, and
# gives the job's images back to the owner's quota; a completed job keeps its status. Returns the
# status, or 'gone' when there is no such job or it belongs to another key.
CANCEL = (
    _SET_STATUS
    + QUOTA_FUNCTIONS
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or (redis.call('HGET', KEYS[1], 'owner') or '') ~= ARGV[2] then
  return 'gone'
end
quota_release(KEYS[5], KEYS[6], redis.call('HGET', KEYS[1], 'id'))
if status == 'queued' or status == 'running' then
  set_status(KEYS[1], KEYS[4], status, 'cancelled')
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[1])
  status = 'cancelled'
end
redis.call('HSET', KEYS[1], 'results_deleted', '1')
redis.call('UNLINK', KEYS[2], KEYS[3])
return status
"""
)

# KEYS: job hash, results hash, blobs hash, job counts. Deletes everything a job wrote, for a job
# whose submission failed. Deleting comes first, which a full Redis allows (and which then lets the
# count change through as well).
DISCARD = """
local status = redis.call('HGET', KEYS[1], 'status')
redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[3])
if status then
  redis.call('HINCRBY', KEYS[4], status, -1)
end
"""


class _JobScripts:
    """What the worker's and the API's store share: the key names, the registered scripts, and the
    KEYS and ARGV each script takes."""

    def __init__(self, client: Redis | redis.asyncio.Redis, prefix: str, ttl_s: int) -> None:
        self.keys = JobKeys(prefix)
        self._tenants = TenantKeys(prefix)
        self._ttl_s = ttl_s
        self._create = client.register_script(CREATE)
        self._store_results = client.register_script(STORE_RESULTS)
        self._mark_running = client.register_script(MARK_RUNNING)
        self._cancel = client.register_script(CANCEL)
        self._discard = client.register_script(DISCARD)

    def _create_call(self, job: JobRecord) -> dict[str, list]:
        fields = [item for pair in job.to_redis().items() for item in pair]
        return {"keys": [self.keys.job(job.id), self.keys.counts()], "args": [self._ttl_s, *fields]}

    def _store_results_call(self, job_id: str, owner: str, results: list[ItemResult], now: int, drop_blobs: bool) -> dict[str, list]:
        """Each result once, flagged when it is an error; the job's image bytes for these items are
        dropped in the same script when ``drop_blobs``."""
        keys = [self.keys.job(job_id), self.keys.results(job_id), self.keys.counts(), *self._tenants.ledger(owner)]
        if drop_blobs:
            keys.append(self.keys.blobs(job_id))
        args: list[str | int] = [self._ttl_s, now]
        for result in results:
            args += [result.index, result.model_dump_json(exclude_none=True), 1 if result.error else 0]
        return {"keys": keys, "args": args}

    def _mark_running_call(self, job_id: str) -> dict[str, list]:
        return {"keys": [self.keys.job(job_id), self.keys.counts()]}

    def _cancel_call(self, job_id: str, owner: str, now: int) -> dict[str, list]:
        keys = [self.keys.job(job_id), self.keys.results(job_id), self.keys.blobs(job_id), self.keys.counts(), *self._tenants.ledger(owner)]
        return {"keys": keys, "args": [now, owner]}

    def _discard_call(self, job_id: str) -> dict[str, list]:
        return {"keys": [self.keys.job(job_id), self.keys.results(job_id), self.keys.blobs(job_id), self.keys.counts()]}


class JobStore(_JobScripts):
    """The worker's side (a sync client): start a job's chunk, store its results, drop image bytes."""

    def __init__(self, client: Redis, prefix: str, ttl_s: int) -> None:
        super().__init__(client, prefix, ttl_s)
        self._redis = client

    def status(self, job_id: str) -> str | None:
        """The job's status; None when it is unknown or expired."""
        status = self._redis.hget(self.keys.job(job_id), "status")
        return None if status is None else status.decode()

    def start(self, job_id: str, indices: list[int]) -> tuple[str, set[int]]:
        """Mark a queued job running; its status ('gone' when unknown), and which of ``indices``
        already have a stored result."""
        try:
            status = self._mark_running(**self._mark_running_call(job_id)).decode()
        except OutOfMemoryError:
            # Redis is full: the job turns running when its first results are stored (which frees
            # image bytes), and refusing the chunk here would leave nothing able to free memory.
            status = self.status(job_id) or "gone"
        stored = self._redis.hmget(self.keys.results(job_id), [str(i) for i in indices])
        return status, {index for index, value in zip(indices, stored) if value is not None}

    def store_results(self, job_id: str, owner: str, results: list[ItemResult], now: int, drop_blobs: bool) -> str:
        """Record each item once (counted once) and settle the owner's quota, in one script; returns
        the job status ('gone' when unknown or cancelled). Raises OutOfMemoryError when Redis is full
        and there were no image bytes to drop."""
        return self._store_results(**self._store_results_call(job_id, owner, results, now, drop_blobs))[3].decode()

    def drop_blobs(self, job_id: str, indices: list[int]) -> None:
        if indices:
            self._redis.hdel(self.keys.blobs(job_id), *(str(i) for i in indices))


class AsyncJobStore(_JobScripts):
    """The API's side (an asyncio client): create, read, cancel and discard jobs."""

    def __init__(self, client: redis.asyncio.Redis, prefix: str, ttl_s: int) -> None:
        super().__init__(client, prefix, ttl_s)
        self._redis = client

    async def create(self, job: JobRecord) -> None:
        await self._create(**self._create_call(job))

    async def store_results(self, job: JobRecord, results: list[ItemResult]) -> None:
        await self._store_results(**self._store_results_call(job.id, job.owner, results, int(time.time()), drop_blobs=False))

    async def get(self, job_id: str) -> JobRecord | None:
        fields = await self._redis.hgetall(self.keys.job(job_id))
        return JobRecord.from_redis(fields) if fields else None

    async def statuses(self, job_ids: list[str]) -> dict[str, str | None]:
        """Each job's status, None for one unknown or expired (one round trip for them all)."""
        pipe = self._redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(self.keys.job(job_id), "status")
        return {job_id: None if status is None else status.decode() for job_id, status in zip(job_ids, await pipe.execute())}

    async def results(self, job_id: str, indices: list[int]) -> list[ItemResult]:
        """The stored results of ``indices``, in their order; unfinished ones left out."""
        if not indices:
            return []
        stored = await self._redis.hmget(self.keys.results(job_id), [str(i) for i in indices])
        return [ItemResult.model_validate_json(raw) for raw in stored if raw is not None]

    async def cancel(self, job_id: str, owner: str) -> str:
        """Cancel what has not run and delete the results (see CANCEL); 'gone' when there is no such
        job or it is another key's."""
        return (await self._cancel(**self._cancel_call(job_id, owner, int(time.time())))).decode()

    async def discard(self, job_id: str) -> None:
        await self._discard(**self._discard_call(job_id))

    def count_jobs(self, pipe: AsyncPipeline) -> None:
        """Queue the read of the service-wide job counts on ``pipe`` (for a caller's single round trip);
        ``job_counts`` reads its answer."""
        pipe.hgetall(self.keys.counts())

    @staticmethod
    def job_counts(raw: dict[bytes, bytes]) -> dict[str, int]:
        """Job status -> number of jobs, from the answer to ``count_jobs``."""
        return {status.decode(): int(count) for status, count in raw.items()}
