"""What the API process holds for its lifetime, and the FastAPI dependency that hands it out."""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio
from celery import Celery
from fastapi import Request

from shared.keys import Keys
from shared.settings import Settings


@dataclass
class AppState:
    settings: Settings
    redis: redis.asyncio.Redis
    celery: Celery
    keys: Keys
    allowed_models: list[str]


def get_state(request: Request) -> AppState:
    return request.app.state.imbeddings
