"""What the API knows about workers: which models are served now, and what each model looks like."""

from __future__ import annotations

from api.errors import ApiError
from api.state import AppState


def resolve_model(state: AppState, requested: str | None) -> str:
    model = requested or state.settings.default_model
    if model not in state.allowed_models:
        raise ApiError(404, f"model {model!r} is not supported here; GET /v1/models lists the models you can use", code="model_not_found", param="model")
    return model


async def live_workers(state: AppState, model: str) -> int:
    return await state.registry.live_workers(model)


def check_dimensions(dimensions: int | None, dim: int) -> None:
    """Refuse a truncation longer than the model's vectors of ``dim`` components."""
    if dimensions is not None and dimensions > dim:
        raise ApiError(400, f"dimensions={dimensions} is larger than the model's embedding size {dim}", code="invalid_dimensions", param="dimensions")


async def validate_dimensions(state: AppState, model: str, dimensions: int | None) -> None:
    """Refuse a truncation longer than the vectors, when a worker has told us how long they are."""
    if dimensions is None:
        return
    info = await state.registry.model_info(model)
    if info is not None:
        check_dimensions(dimensions, info.dim)


async def require_served(state: AppState, model: str) -> None:
    if await live_workers(state, model) == 0:
        raise ApiError(
            503, f"no worker is serving model {model!r} right now; retry later", code="model_not_served", param="model", headers={"Retry-After": "5"}
        )
