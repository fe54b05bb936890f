"""``GET /v1/models``: the allow-list, and for each model whether and how it is served now."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import StateDep
from api.errors import ERROR_RESPONSES, ApiError
from api.schemas import ModelCard, ModelList
from api.state import AppState
from shared.errors import ErrorCode
from shared.protocol import ModelInfo, ModelShape

router = APIRouter()


async def _card(state: AppState, model: str, infos: dict[str, ModelInfo]) -> ModelCard:
    workers = await state.registry.live_workers(model)
    info = infos.get(model)
    shape = info.model_dump(include=set(ModelShape.model_fields)) if info else {}
    return ModelCard(id=model, served=workers > 0, workers=workers, **shape)


@router.get("/models", response_model=ModelList, responses=ERROR_RESPONSES, summary="Models that may be requested")
async def list_models(state: StateDep) -> ModelList:
    infos = await state.registry.model_infos()
    return ModelList(data=[await _card(state, model, infos) for model in state.allowed_models])


@router.get("/models/{model_id:path}", response_model=ModelCard, responses=ERROR_RESPONSES, summary="One model")
async def get_model(model_id: str, state: StateDep) -> ModelCard:
    if model_id not in state.allowed_models:
        raise ApiError(ErrorCode.MODEL_NOT_FOUND, f"model {model_id!r} is not supported here", param="model")
    return await _card(state, model_id, await state.registry.model_infos())
