"""A synchronous request's exchange between the API and a worker, and the image-bytes hashes.

Three structures per request, all owned here:

- ``blobs:<work>``: hash, input index -> image bytes, stored by the API for the worker (a claim
  check: bytes do not ride in task messages); deleted with the reply, or when the API withdraws;
- ``reply:<work>``: list the worker pushes the request's results onto, and the API blocks on;
- ``abandoned:<reply>``: set by the API when it stopped waiting (deadline, client gone), so workers
  skip the work and its reply is not pushed.

A job's image bytes live in a hash of the same layout named by the jobs store; ``store_image_bytes``
and ``read_image_bytes`` serve both, the hash being named in each ``BlobRef``.

A worker starting a request claims it (``shared.store.claims``), checks the flag and reads the bytes
in one round trip (``RequestReplies.start``, for all the requests of a task at once); its reply and
the deletion of the bytes are one script, the replies of requests finished together one round trip.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import redis.asyncio
from redis import Redis
from redis.asyncio.client import Pipeline as AsyncPipeline
from redis.client import Pipeline
from redis.exceptions import NoScriptError, RedisError

from shared.protocol import BlobRef, EmbedPayload
from shared.store.claims import claim

# Commands per pipeline when storing image bytes: a 100,000-image job is not one giant command buffer.
PIPELINE_COMMANDS = 256

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


@dataclass(frozen=True)
class RequestKeys:
    prefix: str

    def blobs(self, work_id: str) -> str:
        """Hash: input index -> image bytes of one request."""
        return f"{self.prefix}blobs:{work_id}"

    def reply(self, work_id: str) -> str:
        """List the worker pushes one request's results onto."""
        return f"{self.prefix}reply:{work_id}"

    def abandoned(self, reply_key: str) -> str:
        """Set when the API stopped waiting for the reply on ``reply_key``."""
        return f"{self.prefix}abandoned:{reply_key}"


async def store_image_bytes(redis: redis.asyncio.Redis, blob_key: str, images: Iterable[tuple[int, bytes]], ttl_s: int) -> None:
    """Store images under their index in the hash ``blob_key``, which expires after ``ttl_s``."""
    pipe = redis.pipeline(transaction=False)
    for index, data in images:
        pipe.hset(blob_key, str(index), data)
        if len(pipe) >= PIPELINE_COMMANDS:
            await _flush_with_expiry(pipe, blob_key, ttl_s)
    if len(pipe):
        await _flush_with_expiry(pipe, blob_key, ttl_s)


async def _flush_with_expiry(pipe: AsyncPipeline, blob_key: str, ttl_s: int) -> None:
    # Every flush sets the expiry, so a submission that fails part-way never leaves bytes without one.
    pipe.expire(blob_key, ttl_s)
    await pipe.execute()


class _ImageBytesRead:
    """One HMGET per hash holding the refs' bytes, queued on a pipeline; then each ref's bytes."""

    def __init__(self, refs: list[BlobRef]) -> None:
        self._refs = refs
        self._fields: dict[str, list[str]] = {}
        for ref in refs:
            self._fields.setdefault(ref.blob_key, []).append(str(ref.index))

    @property
    def commands(self) -> int:
        """How many commands ``queue`` queues."""
        return len(self._fields)

    def queue(self, pipe: Pipeline) -> None:
        for key, names in self._fields.items():
            pipe.hmget(key, names)

    def result(self, replies: list[list[bytes | None]]) -> list[bytes | None]:
        """Each ref's bytes (None where they expired), from the replies to ``queue``'s commands."""
        found: dict[tuple[str, str], bytes | None] = {}
        for (key, names), values in zip(self._fields.items(), replies, strict=True):
            found.update(zip(((key, name) for name in names), values))
        return [found[(ref.blob_key, str(ref.index))] for ref in self._refs]


def read_image_bytes(redis: Redis, refs: list[BlobRef]) -> list[bytes | None]:
    """Each ref's image bytes (None where they expired), in one round trip."""
    if not refs:
        return []
    read = _ImageBytesRead(refs)
    pipe = redis.pipeline(transaction=False)
    read.queue(pipe)
    return read.result(pipe.execute())


@dataclass(frozen=True)
class SyncRequest:
    """The keys of one dispatch of a synchronous request."""

    blobs_key: str
    reply_key: str


class RequestExchange:
    """The API's side (asyncio clients): store the images, wait for the reply, withdraw."""

    def __init__(self, redis: redis.asyncio.Redis, waits: redis.asyncio.Redis, prefix: str) -> None:
        self._redis = redis
        # Blocking waits for replies have their own connections, whose read timeout covers one slice of a wait.
        self._waits = waits
        self._keys = RequestKeys(prefix)

    def open(self, work_id: str) -> SyncRequest:
        return SyncRequest(blobs_key=self._keys.blobs(work_id), reply_key=self._keys.reply(work_id))

    def stash(self, pipe: AsyncPipeline, request: SyncRequest, images: list[tuple[int, bytes]], ttl_s: int) -> None:
        """Queue on ``pipe`` the storing of the request's images under their index, expiring after ``ttl_s``."""
        if images:
            pipe.hset(request.blobs_key, mapping={str(index): data for index, data in images})
            pipe.expire(request.blobs_key, ttl_s)

    def waits(self) -> AsyncPipeline:
        """A pipeline on the connections for waits, for a wait and what follows it."""
        return self._waits.pipeline(transaction=False)

    @staticmethod
    def queue_wait(pipe: AsyncPipeline, request: SyncRequest, timeout_s: float) -> None:
        """Queue on ``pipe`` a wait of up to ``timeout_s`` for the request's reply, which stays in its list
        (moved onto the list itself, so it keeps the list's expiry) for a command queued behind to take."""
        pipe.blmove(request.reply_key, request.reply_key, timeout_s, "LEFT", "RIGHT")

    async def withdraw(self, request: SyncRequest, ttl_s: int) -> None:
        """Tell workers to skip the request, and drop its image bytes now.

        A result that still arrives expires unread. A full Redis refuses the flag but not the deletion.
        """
        pipe = self._redis.pipeline(transaction=False)
        pipe.delete(request.blobs_key)
        pipe.set(self._keys.abandoned(request.reply_key), b"1", ex=ttl_s)
        await pipe.execute(raise_on_error=False)


@dataclass(frozen=True)
class StartedRequest:
    """A request a worker has claimed, with the replies to the read of its image bytes."""

    _read: _ImageBytesRead
    _replies: list[list[bytes | None] | Exception]

    def image_bytes(self) -> list[bytes | None]:
        """The bytes of each ``BlobRef`` of the request's items, in order (None where they expired);
        raises what Redis refused."""
        values: list[list[bytes | None]] = []
        for reply in self._replies:
            if isinstance(reply, Exception):
                raise reply
            values.append(reply)
        return self._read.result(values)


class RequestReplies:
    """The worker's side (synchronous client): whether a request is still wanted, and its reply."""

    def __init__(self, redis: Redis, prefix: str, reply_ttl_s: int) -> None:
        self._redis = redis
        self._prefix = prefix
        self._keys = RequestKeys(prefix)
        self._ttl_s = reply_ttl_s
        self._reply = redis.register_script(REPLY)

    def start(self, requests: list[EmbedPayload], worker_name: str) -> list[StartedRequest | None]:
        """Claim each request for ``worker_name``, check that the API still waits for it, and read its
        image bytes, in one round trip for them all. None for a request the API has stopped waiting
        for (its claim, set anyway, expires unread). Raises what Redis refused of a claim (a full
        Redis refuses it); what it refused of a read is raised by ``StartedRequest.image_bytes``."""
        reads = [_ImageBytesRead([ref for ref in request.items if isinstance(ref, BlobRef)]) for request in requests]
        pipe = self._redis.pipeline(transaction=False)
        for request, read in zip(requests, reads):
            pipe.exists(self._keys.abandoned(request.reply_key))
            claim(pipe, self._prefix, request.reply_key, worker_name, request.deadline)
            read.queue(pipe)
        replies = iter(pipe.execute(raise_on_error=False))
        started: list[StartedRequest | None] = []
        for read in reads:
            abandoned, claimed = next(replies), next(replies)
            for reply in (abandoned, claimed):
                if isinstance(reply, Exception):
                    raise reply
            values = [next(replies) for _ in range(read.commands)]
            started.append(None if abandoned else StartedRequest(read, values))
        return started

    def abandoned(self, reply_key: str) -> bool:
        return bool(self._redis.exists(self._keys.abandoned(reply_key)))

    def abandoned_among(self, reply_keys: list[str]) -> list[bool]:
        """Whether each request was abandoned, in one round trip for them all."""
        return [flag is not None for flag in self._redis.mget([self._keys.abandoned(key) for key in reply_keys])]

    def push(self, replies: list[tuple[EmbedPayload, str]]) -> list[bool | Exception]:
        """Push each request's results (JSON) and drop its image bytes, in one round trip for them
        all: True where pushed, False for a request the API had stopped waiting for (its results are
        discarded), or what Redis refused of that request's push (a full Redis, a lost connection)."""
        pipe = self._redis.pipeline(transaction=False)
        for request, results_json in replies:
            keys = self._reply_keys(request)
            # By digest: a pipeline's registered scripts would cost a SCRIPT EXISTS round trip each time.
            pipe.evalsha(self._reply.sha, len(keys), *keys, results_json, self._ttl_s)
        try:
            answers = pipe.execute(raise_on_error=False)
        except RedisError as exc:  # the connection failed: none of them was answered
            return [exc for _ in replies]
        pushed: list[bool | Exception] = []
        for (request, results_json), answer in zip(replies, answers, strict=True):
            if isinstance(answer, NoScriptError):  # Redis lost its scripts (a restart): this loads it again
                try:
                    answer = self._reply(keys=self._reply_keys(request), args=[results_json, self._ttl_s])
                except RedisError as exc:
                    answer = exc
            pushed.append(answer if isinstance(answer, Exception) else bool(answer))
        return pushed

    def _reply_keys(self, request: EmbedPayload) -> list[str]:
        blobs = sorted({ref.blob_key for ref in request.items if isinstance(ref, BlobRef)})
        return [request.reply_key, self._keys.abandoned(request.reply_key), *blobs]
