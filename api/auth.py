"""API keys: ``Authorization: Bearer <key>`` on every /v1 route when keys are configured."""

from __future__ import annotations

import hmac

from fastapi import Depends, Request

from api.errors import ApiError
from api.state import AppState, get_state


def require_api_key(request: Request, state: AppState = Depends(get_state)) -> None:
    keys = state.settings.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise ApiError(401, "missing API key: send `Authorization: Bearer <key>`", code="missing_api_key", headers={"WWW-Authenticate": "Bearer"})
    candidate = presented.strip().encode()
    # Compare against every key, in constant time each, so timing reveals neither key nor position.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate, key.get_secret_value().encode())
    if not matched:
        raise ApiError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
