"""OpenAI Batch API for ``/v1/embeddings``: create, retrieve, cancel, list."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from api.batches import BatchObject, cancel_batch, create_batch, get_batch, list_batches
from api.deps import KeyIdDep, StateDep
from api.errors import ERROR_RESPONSES

router = APIRouter()


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(description="A file uploaded with purpose 'batch'.")
    endpoint: str = Field(description='Only "/v1/embeddings".')
    completion_window: str = Field(description='Only "24h".')
    metadata: dict[str, str] | None = None


@router.post("/batches", response_model=BatchObject, responses=ERROR_RESPONSES, summary="Run every request of an uploaded file as a batch")
async def submit_batch(body: BatchCreate, request: Request, key_id: KeyIdDep, state: StateDep) -> BatchObject:
    return await create_batch(state, key_id, body.input_file_id, body.endpoint, body.completion_window, body.metadata, request.state.request_id)


@router.get("/batches/{batch_id}", response_model=BatchObject, responses=ERROR_RESPONSES, summary="A batch's status and request counts")
async def batch_status(batch_id: str, key_id: KeyIdDep, state: StateDep) -> BatchObject:
    return await get_batch(state, key_id, batch_id)


@router.post("/batches/{batch_id}/cancel", response_model=BatchObject, responses=ERROR_RESPONSES, summary="Cancel a batch (finished requests are kept)")
async def batch_cancel(batch_id: str, key_id: KeyIdDep, state: StateDep) -> BatchObject:
    return await cancel_batch(state, key_id, batch_id)


@router.get("/batches", responses=ERROR_RESPONSES, summary="The caller's batches, newest first")
async def batches(key_id: KeyIdDep, state: StateDep, after: str | None = None, limit: int = Query(20, ge=1, le=100)) -> dict[str, Any]:
    return await list_batches(state, key_id, after, limit)
