"""Files of the OpenAI Batch API: uploaded batch inputs and the output and error files of batches.

A file is one Redis hash (its record and its bytes; this module alone names and touches it) kept as long as job data
(``IMBEDDINGS_JOB_RESULT_TTL_S``); an upload is bounded by ``IMBEDDINGS_MAX_REQUEST_BYTES``. A file
belongs to the API key that created it: any other key is told it does not exist.
"""

from __future__ import annotations

import secrets
import time
from typing import Literal

from pydantic import BaseModel

from api.errors import ApiError
from api.state import AppState
from shared.errors import ErrorCode

FilePurpose = Literal["batch", "batch_output"]


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    expires_at: int
    filename: str
    purpose: FilePurpose
    status: Literal["processed"] = "processed"


def _key(state: AppState, file_id: str) -> str:
    """Hash: a file's record fields plus its bytes under ``content``."""
    return f"{state.settings.redis_key_prefix}file:{file_id}"


async def store_file(state: AppState, owner: str, filename: str, purpose: FilePurpose, content: bytes) -> FileObject:
    now = int(time.time())
    ttl = state.settings.job_result_ttl_s
    record = FileObject(id=f"file-{secrets.token_hex(12)}", bytes=len(content), created_at=now, expires_at=now + ttl, filename=filename, purpose=purpose)
    key = _key(state, record.id)
    # Files live where job data lives, so they count against the same Redis byte budget (507 when full).
    async with state.memory.reserve(len(content), "file"):
        pipe = state.redis.pipeline(transaction=True)
        pipe.hset(key, mapping={**record.model_dump(exclude={"object", "status"}), "owner": owner, "content": content})
        pipe.expire(key, ttl)
        await pipe.execute()
    return record


def _not_found(file_id: str) -> ApiError:
    return ApiError(ErrorCode.FILE_NOT_FOUND, f"no file with id {file_id!r} (files are kept as long as job results)", param="file_id")


async def get_file(state: AppState, owner: str, file_id: str) -> FileObject:
    fields = await state.redis.hmget(_key(state, file_id), ["owner", "bytes", "created_at", "expires_at", "filename", "purpose"])
    if fields[0] is None or fields[0].decode() != owner:
        raise _not_found(file_id)
    size, created, expires, filename, purpose = (value.decode() for value in fields[1:])
    return FileObject(id=file_id, bytes=int(size), created_at=int(created), expires_at=int(expires), filename=filename, purpose=purpose)


async def file_content(state: AppState, owner: str, file_id: str) -> bytes:
    await get_file(state, owner, file_id)
    content = await state.redis.hget(_key(state, file_id), "content")
    if content is None:
        raise _not_found(file_id)
    return content


async def delete_file(state: AppState, owner: str, file_id: str) -> None:
    await get_file(state, owner, file_id)
    await state.redis.unlink(_key(state, file_id))
