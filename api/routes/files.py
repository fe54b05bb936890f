"""OpenAI Files API for batches: ``POST /v1/files``, ``GET /v1/files/{id}``, its ``/content``, ``DELETE``."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel

from api.deps import KeyIdDep, StateDep
from api.errors import ERROR_RESPONSES, ApiError
from api.files import FileObject, delete_file, file_content, get_file, store_file
from shared.errors import ErrorCode

router = APIRouter()


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


@router.post("/files", response_model=FileObject, responses=ERROR_RESPONSES, summary="Upload a batch input file (JSONL of /v1/embeddings requests)")
async def upload_file(key_id: KeyIdDep, state: StateDep, file: UploadFile = File(...), purpose: str = Form(...)) -> FileObject:
    if purpose != "batch":
        raise ApiError(ErrorCode.INVALID_PURPOSE, f"purpose {purpose!r} is not supported: only 'batch'", param="purpose")
    content = await file.read()  # the body limit (IMBEDDINGS_MAX_REQUEST_BYTES) has already bounded it
    return await store_file(state, key_id, file.filename or "upload.jsonl", "batch", content)


@router.get("/files/{file_id}", response_model=FileObject, responses=ERROR_RESPONSES, summary="A file's record")
async def file_record(file_id: str, key_id: KeyIdDep, state: StateDep) -> FileObject:
    return await get_file(state, key_id, file_id)


@router.get("/files/{file_id}/content", responses={200: {"content": {"application/octet-stream": {}}}, **ERROR_RESPONSES}, summary="A file's bytes")
async def file_bytes(file_id: str, key_id: KeyIdDep, state: StateDep) -> Response:
    return Response(await file_content(state, key_id, file_id), media_type="application/octet-stream")


@router.delete("/files/{file_id}", response_model=FileDeleted, responses=ERROR_RESPONSES, summary="Delete a file")
async def remove_file(file_id: str, key_id: KeyIdDep, state: StateDep) -> FileDeleted:
    await delete_file(state, key_id, file_id)
    return FileDeleted(id=file_id)
