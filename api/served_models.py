"""Which model a request names, and whether its dimensions fit the vectors the workers reported."""

from __future__ import annotations

from api.errors import ApiError
from api.state import AppState
from shared.errors import ErrorCode, oversized_dimensions


def resolve_model(state: AppState, requested: str | None) -> str:
    model = requested or state.settings.default_model
    if model not in state.allowed_models:
        raise ApiError(ErrorCode.MODEL_NOT_FOUND, f"model {model!r} is not supported here; GET /v1/models lists the models you can use", param="model")
    return model


async def validate_dimensions(state: AppState, model: str, dimensions: int | None) -> None:
    """Refuse a truncation longer than the vectors, when a worker has told us how long they are."""
    if dimensions is None:
        return
    info = await state.registry.model_info(model)
    if info is not None and dimensions > info.dim:
        raise ApiError(ErrorCode.INVALID_DIMENSIONS, oversized_dimensions(dimensions, info.dim), param="dimensions")
