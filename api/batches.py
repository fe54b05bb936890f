"""The OpenAI Batch API over jobs: each line of an input file becomes one job; when every job is done
the batch writes an output file (one line per request answered 200) and an error file (every other
line), in OpenAI's batch output format, and deletes the jobs, whose results now live in the files.

A batch's state is refreshed when it is read: there is no background process to keep alive. This
module alone names and touches a batch's record (``batch:<id>``) and each key's list of batches
(``batches:<key id>``); it reads jobs through their store (``state.jobs``).
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ValidationError

from api.async_jobs import cancel_job, create_job, get_job, item_results
from api.errors import ApiError, error_body, first_failure
from api.files import file_content, get_file, store_file
from api.schemas import EmbeddingRequest, embedding_dim, embedding_item
from api.state import AppState
from shared.errors import ErrorCode

ENDPOINT = "/v1/embeddings"
COMPLETION_WINDOW = "24h"
MAX_BATCH_LINES = 50_000  # OpenAI's own limit per batch
BatchStatus = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"]


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    metadata: dict[str, str] | None = None


class BatchLine(BaseModel):
    """One request of the input file: the job it became, or why it was refused."""

    custom_id: str
    job_id: str | None = None
    error: dict[str, str] | None = None


class _Record(BaseModel):
    batch: BatchObject
    owner: str
    lines: list[BatchLine]


def _batch_key(state: AppState, batch_id: str) -> str:
    """Hash: a batch's record (its lines and their jobs as JSON) and its owner."""
    return f"{state.settings.redis_key_prefix}batch:{batch_id}"


def _owner_batches_key(state: AppState, owner: str) -> str:
    """Sorted set: the batch ids one API key created, scored by creation time."""
    return f"{state.settings.redis_key_prefix}batches:{owner}"


def _line_error(code: ErrorCode, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


async def _parse_line(state: AppState, owner: str, number: int, text: str, seen: set[str], request_id: str) -> BatchLine:
    try:
        request = json.loads(text)
    except ValueError as exc:
        return BatchLine(custom_id=f"line-{number}", error=_line_error(ErrorCode.INVALID_JSON, f"line {number}: not JSON ({exc})"))
    if not isinstance(request, dict) or not isinstance(request.get("custom_id"), str) or not request["custom_id"]:
        return BatchLine(custom_id=f"line-{number}", error=_line_error(ErrorCode.INVALID_REQUEST, f"line {number}: custom_id must be a non-empty string"))
    custom_id = request["custom_id"]
    if custom_id in seen:
        return BatchLine(
            custom_id=custom_id,
            error=_line_error(ErrorCode.DUPLICATE_CUSTOM_ID, f"line {number}: custom_id {custom_id!r} is used by an earlier line"),
        )
    seen.add(custom_id)
    if request.get("method") != "POST" or request.get("url") != ENDPOINT:
        return BatchLine(custom_id=custom_id, error=_line_error(ErrorCode.INVALID_REQUEST, f'line {number}: method must be "POST" and url "{ENDPOINT}"'))
    try:
        body = EmbeddingRequest.model_validate(request.get("body"))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = "".join(f".{part}" for part in first["loc"])
        return BatchLine(custom_id=custom_id, error=_line_error(ErrorCode.INVALID_REQUEST, f"line {number}: body{where}: {first['msg']}"))
    try:
        job = await create_job(state, body, request_id, owner)
    except ApiError as exc:
        return BatchLine(custom_id=custom_id, error=_line_error(exc.code, f"line {number}: {exc.message}"))
    return BatchLine(custom_id=custom_id, job_id=job.id)


async def create_batch(
    state: AppState, owner: str, input_file_id: str, endpoint: str, completion_window: str, metadata: dict[str, str] | None, request_id: str
) -> BatchObject:
    if endpoint != ENDPOINT:
        raise ApiError(ErrorCode.INVALID_ENDPOINT, f"endpoint {endpoint!r} is not supported: this service batches only {ENDPOINT}", param="endpoint")
    if completion_window != COMPLETION_WINDOW:
        raise ApiError(ErrorCode.INVALID_COMPLETION_WINDOW, f"completion_window must be {COMPLETION_WINDOW!r}", param="completion_window")
    file = await get_file(state, owner, input_file_id)
    if file.purpose != "batch":
        raise ApiError(ErrorCode.INVALID_FILE, f"file {input_file_id!r} has purpose {file.purpose!r}, not 'batch'", param="input_file_id")
    try:
        texts = [text for text in (await file_content(state, owner, input_file_id)).decode("utf-8").splitlines() if text.strip()]
    except UnicodeDecodeError:
        raise ApiError(ErrorCode.INVALID_FILE, f"file {input_file_id!r} is not UTF-8 JSONL", param="input_file_id") from None
    if not texts:
        raise ApiError(ErrorCode.INVALID_FILE, f"file {input_file_id!r} holds no requests", param="input_file_id")
    if len(texts) > MAX_BATCH_LINES:
        raise ApiError(
            ErrorCode.INVALID_FILE,
            f"file {input_file_id!r} holds {len(texts)} requests, over the limit of {MAX_BATCH_LINES} per batch",
            param="input_file_id",
        )
    seen: set[str] = set()
    lines = [await _parse_line(state, owner, number, text, seen, request_id) for number, text in enumerate(texts, 1)]
    now = int(time.time())
    ttl = state.settings.job_result_ttl_s
    batch = BatchObject(
        id=f"batch_{secrets.token_hex(12)}", endpoint=endpoint, input_file_id=input_file_id, completion_window=completion_window, status="in_progress",
        created_at=now, in_progress_at=now, expires_at=now + 24 * 3600, metadata=metadata,
        request_counts=RequestCounts(total=len(lines), completed=0, failed=0),
    )  # fmt: skip
    record = _Record(batch=batch, owner=owner, lines=lines)
    pipe = state.redis.pipeline(transaction=True)
    pipe.hset(_batch_key(state, batch.id), mapping={"record": record.model_dump_json(), "owner": owner})
    pipe.expire(_batch_key(state, batch.id), ttl)
    pipe.zadd(_owner_batches_key(state, owner), {batch.id: now})
    pipe.expire(_owner_batches_key(state, owner), ttl)
    await pipe.execute()
    # The answer is the batch as created (in_progress), as OpenAI's create answers: reading its jobs
    # back here could already find them all done and answer "completed" to the create call.
    return batch


async def _load(state: AppState, owner: str, batch_id: str) -> _Record:
    raw = await state.redis.hget(_batch_key(state, batch_id), "record")
    record = _Record.model_validate_json(raw) if raw is not None else None
    if record is None or record.owner != owner:
        raise ApiError(ErrorCode.BATCH_NOT_FOUND, f"no batch with id {batch_id!r}", param="batch_id")
    return record


async def _save(state: AppState, record: _Record) -> None:
    await state.redis.hset(_batch_key(state, record.batch.id), "record", record.model_dump_json())


async def _job_statuses(state: AppState, record: _Record) -> dict[str, str | None]:
    return await state.jobs.statuses([line.job_id for line in record.lines if line.job_id])


async def get_batch(state: AppState, owner: str, batch_id: str) -> BatchObject:
    record = await _load(state, owner, batch_id)
    if record.batch.status == "in_progress":
        statuses = await _job_statuses(state, record)
        if all(status != "queued" and status != "running" for status in statuses.values()):
            return await _finalize(state, record, "completed")
    return record.batch


async def cancel_batch(state: AppState, owner: str, batch_id: str) -> BatchObject:
    record = await _load(state, owner, batch_id)
    if record.batch.status != "in_progress":
        return record.batch
    statuses = await _job_statuses(state, record)
    for job_id, status in statuses.items():
        if status in ("queued", "running"):
            await cancel_job(state, job_id, owner)
    return await _finalize(state, record, "cancelled")


async def _outcome(state: AppState, owner: str, line: BatchLine, request_number: int) -> tuple[dict[str, Any], bool]:
    """The line's entry in the output or error file, and whether it succeeded."""
    entry: dict[str, Any] = {"id": f"batch_req_{request_number:06d}_{secrets.token_hex(6)}", "custom_id": line.custom_id, "response": None, "error": None}
    if line.job_id is None:
        entry["error"] = line.error
        return entry, False
    try:
        job = await get_job(state, line.job_id, owner)
    except ApiError as exc:
        entry["error"] = _line_error(exc.code, exc.message)
        return entry, False
    if job.status != "completed" or job.results_deleted:
        entry["error"] = _line_error(ErrorCode.BATCH_CANCELLED, "the batch was cancelled before this request finished")
        return entry, False
    results = await item_results(state, job, 0, job.total)
    failure = first_failure(results)
    if failure is not None:
        entry["response"] = {
            "status_code": failure.status,
            "request_id": job.id,
            "body": {"error": error_body(failure.code, failure.message, failure.param, failure.type)},
        }
        return entry, False
    tokens = sum(result.tokens or 0 for result in results)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens, "input_images": len(results), "embedding_dim": job.dimensions or embedding_dim(results[0])}
    data = [embedding_item(result, job.pooling, job.encoding_format, job.dimensions) for result in results]
    entry["response"] = {"status_code": 200, "request_id": job.id, "body": {"object": "list", "model": job.model, "data": data, "usage": usage}}
    return entry, True


async def _finalize(state: AppState, record: _Record, status: BatchStatus) -> BatchObject:
    """Write the output and error files, delete the jobs, and close the batch; only one caller does it."""
    now = int(time.time())
    if not await state.redis.hsetnx(_batch_key(state, record.batch.id), "finalizing", now):
        return (await _load(state, record.owner, record.batch.id)).batch
    outputs, errors = [], []
    for number, line in enumerate(record.lines):
        entry, ok = await _outcome(state, record.owner, line, number)
        (outputs if ok else errors).append(orjson.dumps(entry, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
    batch = record.batch
    if outputs:
        batch.output_file_id = (await store_file(state, record.owner, f"{batch.id}_output.jsonl", "batch_output", b"".join(outputs))).id
    if errors:
        batch.error_file_id = (await store_file(state, record.owner, f"{batch.id}_error.jsonl", "batch_output", b"".join(errors))).id
    for line in record.lines:
        if line.job_id:
            try:
                await cancel_job(state, line.job_id, record.owner)  # the results are in the files now
            except ApiError:
                pass  # already expired
    batch.status = status
    batch.finalizing_at = now
    batch.request_counts = RequestCounts(total=len(record.lines), completed=len(outputs), failed=len(errors))
    if status == "cancelled":
        batch.cancelling_at = batch.cancelled_at = now
    else:
        batch.completed_at = now
    await _save(state, record)
    return batch


async def list_batches(state: AppState, owner: str, after: str | None, limit: int) -> dict[str, Any]:
    """The caller's batches, newest first, ``limit`` at a time after the batch ``after``."""
    ids = [value.decode() for value in await state.redis.zrevrange(_owner_batches_key(state, owner), 0, -1)]
    if after is not None and after in ids:
        ids = ids[ids.index(after) + 1 :]
    batches = []
    for batch_id in ids[: limit + 1]:
        try:
            batches.append(await get_batch(state, owner, batch_id))
        except ApiError:
            continue  # expired
    page = batches[:limit]
    return {
        "object": "list",
        "data": [b.model_dump() for b in page],
        "first_id": page[0].id if page else None,
        "last_id": page[-1].id if page else None,
        "has_more": len(batches) > limit,
    }
