"""The FastAPI application: middleware, error handlers, routers, and the Redis/Celery handles."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi_offline import FastAPIOffline

from api.auth import require_api_key
from api.body_budget import BodyBudget
from api.errors import install_error_handlers
from api.heap import freeze_startup_heap
from api.middleware import BodyLimitMiddleware, ObservabilityMiddleware
from api.routes import batches, embeddings, files, health, jobs, models
from api.state import AppState
from shared.celery_app import create_celery_app
from shared.model_catalog import allowed_models
from shared.redis_client import API_COMMAND_TIMEOUT_S, async_client
from shared.settings import Settings

# A waiting request blocks on Redis in slices this long; between slices it checks that the worker
# holding it is alive. Shorter slices notice a lost worker sooner at one more round trip each.
WAIT_SLICE_S = 2.0
DOCS_ASSETS = "/docs-assets"
V1 = "/v1"


def create_app(settings: Settings) -> FastAPI:
    allowed = allowed_models(settings.supported_models_file, settings.default_model)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = async_client(settings.redis_url, sentinel_master=settings.redis_sentinel_master)
        waits = async_client(settings.redis_url, socket_timeout=WAIT_SLICE_S + API_COMMAND_TIMEOUT_S, sentinel_master=settings.redis_sentinel_master)
        celery = create_celery_app(settings)
        app.state.imbeddings = AppState(settings, redis, waits, WAIT_SLICE_S, celery, allowed)
        freeze_startup_heap()
        try:
            yield
        finally:
            await redis.aclose()
            await waits.aclose()
            celery.close()

    about = {
        "title": "Imbeddings",
        "summary": "Image embeddings (CLS and MEAN of a Vision Transformer) behind an OpenAI-style API.",
        "version": "1.0.0",
        "lifespan": lifespan,
        # The service's metrics are Prometheus's (api.metrics); FastAPI's OpenTelemetry hooks, left on,
        # looked for configured OpenTelemetry providers on every request.
        "telemetry": {"tracing": False, "metrics": False, "logs": False},
    }
    # The docs pages load Swagger UI and ReDoc from the fastapi-offline package, not from a CDN, so
    # they work on an air-gapped host.
    if settings.docs_enabled:
        app: FastAPI = FastAPIOffline(**about, docs_url="/docs", redoc_url="/redoc", static_url=DOCS_ASSETS)
    else:
        app = FastAPI(**about, docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    # Each router is included on the app itself: FastAPI matches a request through every level of
    # included routers, so a /v1 router holding them would cost each request one more.
    for routes in (embeddings.router, jobs.router, files.router, batches.router, models.router):
        app.include_router(routes, prefix=V1, dependencies=[Depends(require_api_key)])
    app.include_router(health.router)
    # Added last runs first: a refused oversize body is still counted, logged and given an id.
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_request_bytes,
        budget=BodyBudget(settings.max_buffered_bytes),
        timeout_s=settings.body_timeout_s,
        streamed_paths=frozenset({V1 + jobs.SUBMIT_PATH}),
    )
    app.add_middleware(ObservabilityMiddleware)
    return app
