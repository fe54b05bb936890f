"""The dependencies routes share (FastAPI's ``Annotated`` style): the app's state and the caller's key id."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.auth import require_api_key
from api.state import AppState, get_state


async def _state(request: Request) -> AppState:
    # A coroutine: FastAPI runs a plain function dependency in a worker thread, a hop per request.
    return get_state(request)


StateDep = Annotated[AppState, Depends(_state)]
KeyIdDep = Annotated[str, Depends(require_api_key)]
