"""Liveness, readiness, effective configuration and metrics.

``/health``, ``/ready`` and ``/metrics`` are open: probes and Prometheus scrape them without
credentials, and they hold no secrets (key ids, never keys). ``/info`` needs a key when keys are
configured: the limits and model paths it lists are a map of the deployment.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from redis.exceptions import RedisError

from api import metrics
from api.auth import require_api_key
from api.deps import StateDep
from api.responses import JSONBytesResponse

router = APIRouter()


@router.get("/health", summary="The API process is alive")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", summary="Redis is reachable and a worker serves the default model")
async def ready(state: StateDep) -> JSONBytesResponse:
    model = state.settings.default_model
    try:
        await state.redis.ping()
        workers = await state.registry.live_workers(model)
    except RedisError as exc:
        return JSONBytesResponse(
            {"status": "unavailable", "redis": f"unreachable ({type(exc).__name__})", "default_model": model, "workers": 0},
            status_code=503,
        )
    body = {"status": "ready" if workers else "unavailable", "redis": "ok", "default_model": model, "workers": workers}
    return JSONBytesResponse(body, status_code=200 if workers else 503)


@router.get("/info", summary="Effective limits and settings (no secrets)", dependencies=[Depends(require_api_key)])
async def info(state: StateDep) -> dict[str, object]:
    return {"settings": state.settings.public_view(), "allowed_models": state.allowed_models}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def prometheus_metrics(state: StateDep) -> Response:
    body, content_type = await metrics.render(state)
    return Response(body, media_type=content_type)
