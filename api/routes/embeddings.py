"""``POST /v1/embeddings``: enqueue, wait for the worker, answer in OpenAI's format."""

from __future__ import annotations

from functools import partial
from operator import attrgetter

import anyio
from fastapi import APIRouter, Request

from api import metrics
from api.errors import ERROR_RESPONSES, ApiError, first_failure
from api.inputs import parse_inputs
from api.json_body import INLINE_PARSE_BYTES, bounded_json_route
from api.responses import JSONBytesResponse
from api.schemas import EmbeddingRequest, EmbeddingResponse, embedding_dim, embedding_item
from api.served_models import resolve_model, validate_dimensions
from api.state import get_state
from api.sync_requests import ClientGone, embed_and_wait
from shared.errors import ErrorCode

router = APIRouter(route_class=bounded_json_route(attrgetter("max_inputs_per_request")))


async def _disconnected(request: Request) -> None:
    """Completes when the client hangs up (the body has been read, so only that message is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.post("/embeddings", response_model=EmbeddingResponse, responses=ERROR_RESPONSES, summary="Embed images (waits for the result)")
async def create_embeddings(body: EmbeddingRequest, request: Request) -> JSONBytesResponse:
    # The state and the key id (which the router's require_api_key dependency set) are read from the
    # request rather than declared as dependencies: FastAPI solves each declared one on every request.
    state = get_state(request)
    key_id: str = request.state.key_id
    settings = state.settings
    model = resolve_model(state, body.model)
    request.state.model = model
    await validate_dimensions(state, model, body.dimensions)
    # Base64 decoding of up to 64 MiB: off the event loop, like the parsing before it, unless the body is small.
    parse = partial(parse_inputs, body.input, settings.max_inputs_per_request, settings.max_image_bytes)
    images = parse() if len(await request.body()) <= INLINE_PARSE_BYTES else await anyio.to_thread.run_sync(parse)
    try:
        results = await embed_and_wait(state, key_id, model, images, request.state.request_id, partial(_disconnected, request))
    except ClientGone:
        # Nobody reads this answer; its status tells the logs and metrics what happened.
        raise ApiError(ErrorCode.CLIENT_CLOSED_REQUEST, "the client closed the connection; the request was withdrawn") from None
    failure = first_failure(results)
    if failure is not None:
        raise failure
    data = [embedding_item(result, body.pooling, body.encoding_format, body.dimensions) for result in results]
    tokens = sum(result.tokens or 0 for result in results)
    dim = body.dimensions or embedding_dim(results[0])
    metrics.IMAGES_EMBEDDED.labels(model).inc(len(data))
    usage = {"prompt_tokens": tokens, "total_tokens": tokens, "input_images": len(results), "embedding_dim": dim}
    return JSONBytesResponse({"object": "list", "model": model, "data": data, "usage": usage})
