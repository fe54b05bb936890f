"""Async jobs: ``POST /v1/jobs`` (202), ``GET /v1/jobs/{id}``, results (paged or JSONL), ``DELETE``."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from api.async_jobs import cancel_job, create_streamed_job, get_job, job_not_found, result_lines, result_page
from api.deps import KeyIdDep, StateDep
from api.errors import ERROR_RESPONSES
from api.json_body import require_json
from api.responses import JSONBytesResponse
from shared.store.jobs import JobView, is_job_id

router = APIRouter()

SUBMIT_PATH = "/jobs"

# A job's body is read as it arrives (api.async_jobs.create_streamed_job), not by FastAPI, so its schema, that of
# /v1/embeddings, is named here.
JOB_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/EmbeddingRequest"}}}}}


def valid_job_id(job_id: Annotated[str, Path(description="A job id as POST /v1/jobs returned it: job_ and 24 hex digits.")], state: StateDep) -> str:
    """The id, when it has the shape of one; 404 otherwise, before it comes near a Redis key name."""
    if not is_job_id(job_id):
        raise job_not_found(state, job_id)
    return job_id


JobId = Annotated[str, Depends(valid_job_id)]


class JobResultsPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict]
    has_more: bool


# The routes return the stored JobRecord; response_model=JobView keeps the answer to what clients see.
@router.post(
    SUBMIT_PATH,
    status_code=202,
    response_model=JobView,
    responses=ERROR_RESPONSES,
    openapi_extra=JOB_BODY,
    summary="Submit an embedding job (large inputs allowed)",
)
async def submit_job(request: Request, key_id: KeyIdDep, state: StateDep) -> JobView:
    require_json(request)
    job = await create_streamed_job(state, request.stream(), request.state.body_hold, request.state.request_id, key_id)
    request.state.model = job.model
    return job


@router.get("/jobs/{job_id}", response_model=JobView, responses=ERROR_RESPONSES, summary="A job's status and progress")
async def job_status(job_id: JobId, key_id: KeyIdDep, state: StateDep) -> JobView:
    return await get_job(state, job_id, key_id)


@router.get("/jobs/{job_id}/results", response_model=JobResultsPage, responses=ERROR_RESPONSES, summary="A page of a job's results, in index order")
async def job_results(
    job_id: JobId,
    key_id: KeyIdDep,
    state: StateDep,
    offset: int = Query(0, ge=0),
    limit: int = Query(100, ge=1, le=1000),
) -> JSONBytesResponse:
    return JSONBytesResponse(await result_page(state, job_id, key_id, offset, limit))


@router.get(
    "/jobs/{job_id}/results.jsonl",
    responses={200: {"content": {"application/x-ndjson": {}}}, **ERROR_RESPONSES},
    summary="All of a job's results as JSON lines",
)
async def job_results_jsonl(job_id: JobId, key_id: KeyIdDep, state: StateDep) -> StreamingResponse:
    job, lines = await result_lines(state, job_id, key_id)
    return StreamingResponse(lines, media_type="application/x-ndjson", headers={"X-Job-Status": job.status})


@router.delete("/jobs/{job_id}", response_model=JobView, responses=ERROR_RESPONSES, summary="Cancel a job and delete its results")
async def delete_job(job_id: JobId, key_id: KeyIdDep, state: StateDep) -> JobView:
    return await cancel_job(state, job_id, key_id)
