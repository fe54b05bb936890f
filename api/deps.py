"""The dependencies routes share (FastAPI's ``Annotated`` style): the app's state and the caller's key id."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends

from api.auth import require_api_key
from api.state import AppState, get_state

StateDep = Annotated[AppState, Depends(get_state)]
KeyIdDep = Annotated[str, Depends(require_api_key)]
