"""Async jobs in Redis: the record both sides read, ids, and the scripts that change job state.

Every state change is one Lua script, so it is atomic: an item's result is written at most once
(``HSETNX``) and counted only when it was, which makes duplicate deliveries of a chunk harmless, and
the job turns ``completed`` in the same step that accounts for its last item.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Literal

from pydantic import BaseModel, Field

from shared.protocol import ItemResult
from shared.store.tenants import QUOTA_FUNCTIONS
from shared.vectors import EncodingFormat

JobStatus = Literal["queued", "running", "completed", "cancelled"]


class JobRecord(BaseModel):
    id: str
    object: Literal["embedding.job"] = "embedding.job"
    status: JobStatus
    model: str
    total: int
    completed: int = 0
    failed: int = 0
    created_at: int
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


def store_results_args(ttl_s: int, now: int, results: list[ItemResult]) -> list[str | int]:
    """ARGV for STORE_RESULTS: each result once, flagged when it is an error."""
    args: list[str | int] = [ttl_s, now]
    for result in results:
        args += [result.index, result.model_dump_json(exclude_none=True), 1 if result.error else 0]
    return args


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

# KEYS: job hash, results hash, job counts, the owner's quota work and images (Keys.tenant_*), and
# optionally the job's image-bytes hash. ARGV: ttl seconds, now, then triples (index, result json,
# "1" if error). Returns {completed, failed, total, status}; status "gone" when the job is unknown
# or cancelled. Items stored leave the owner's quota; a completed job leaves it altogether.
#
# The items' image bytes go first. Redis (noeviction) refuses a script's command that may grow memory
# while it is over maxmemory only until the script has written something: dropping the images first
# lets a chunk's results in when Redis is full, in exchange for the image bytes, which outweigh them.
# A chunk of URLs has no image bytes to drop: a full Redis refuses its results, and the worker
# hands the chunk back.
STORE_RESULTS = _SET_STATUS + QUOTA_FUNCTIONS + """
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

# KEYS: job hash, job counts. Marks a queued job running when a worker starts on it; returns the status.
MARK_RUNNING = _SET_STATUS + """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' then
  set_status(KEYS[1], KEYS[2], status, 'running')
  return 'running'
end
return status or 'gone'
"""

# KEYS: job hash, results hash, blobs hash, job counts, the owner's quota work and images. ARGV:
# now, the caller's key id. Cancels what has not run, drops stored results and image bytes, and
# gives the job's images back to the owner's quota; a completed job keeps its status. Returns the
# status, or 'gone' when there is no such job or it belongs to another key.
CANCEL = _SET_STATUS + QUOTA_FUNCTIONS + """
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
