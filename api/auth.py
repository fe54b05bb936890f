"""API keys: ``Authorization: Bearer <key>`` on every /v1 route (and /info) when keys are configured.

``require_api_key`` (``api.deps.KeyIdDep``) is the dependency that checks the key and answers with the caller's key id:
routes take it to scope jobs and quotas to their owner, and the access log and request metrics
read it from ``request.state.key_id``. Without configured keys every caller is the one tenant ``""``.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from api.errors import ApiError
from api.state import get_state
from shared.errors import ErrorCode

ANONYMOUS = ""


async def require_api_key(request: Request) -> str:
    keys = get_state(request).settings.api_keys
    if not keys:
        request.state.key_id = ANONYMOUS
        return ANONYMOUS
    header = request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise ApiError(ErrorCode.MISSING_API_KEY, "missing API key: send `Authorization: Bearer <key>`", headers={"WWW-Authenticate": "Bearer"})
    candidate = presented.strip().encode()
    # Compare against every key, in constant time each, so timing reveals neither key nor position.
    matched: str | None = None
    for key in keys:
        if hmac.compare_digest(candidate, key.secret.get_secret_value().encode()):
            matched = key.id
    if matched is None:
        raise ApiError(ErrorCode.INVALID_API_KEY, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
    request.state.key_id = matched
    return matched
