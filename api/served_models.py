"""What the API knows about workers: which models are served now, and what each model looks like."""

from __future__ import annotations

import time

from api.errors import ApiError
from api.state import AppState
from shared.protocol import ModelInfo


def resolve_model(state: AppState, requested: str | None) -> str:
    model = requested or state.settings.default_model
    if model not in state.allowed_models:
        raise ApiError(404, f"model {model!r} is not supported here; GET /v1/models lists the models you can use", code="model_not_found", param="model")
    return model


async def live_workers(state: AppState, model: str) -> int:
    return int(await state.redis.zcount(state.keys.model_workers(model), time.time(), "+inf"))


async def model_infos(state: AppState) -> dict[str, ModelInfo]:
    raw = await state.redis.hgetall(state.keys.model_info())
    return {key.decode(): ModelInfo.model_validate_json(value) for key, value in raw.items()}


async def validate_dimensions(state: AppState, model: str, dimensions: int | None) -> None:
    """Refuse a truncation longer than the vectors, when a worker has told us how long they are."""
    if dimensions is None:
        return
    raw = await state.redis.hget(state.keys.model_info(), model)
    if raw is not None and dimensions > (dim := ModelInfo.model_validate_json(raw).dim):
        raise ApiError(400, f"dimensions={dimensions} is larger than the model's embedding size {dim}", code="invalid_dimensions", param="dimensions")


async def require_served(state: AppState, model: str) -> None:
    if await live_workers(state, model) == 0:
        raise ApiError(503, f"no worker is serving model {model!r} right now; retry later", code="model_not_served", param="model", headers={"Retry-After": "5"})
