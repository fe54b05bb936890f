"""Per-key quota: how many images one API key may have queued or in flight, requests and jobs
together (``IMBEDDINGS_KEY_MAX_QUEUED_IMAGES``), so one tenant cannot fill the queue for all.

Jobs are admitted here; a synchronous request is weighed against the same limit inside its
admission script (``api.admission``), which answers with the refusals built here."""

from __future__ import annotations

import math

from api.errors import ApiError
from shared.errors import ErrorCode
from shared.store.registry import ModelRegistry
from shared.store.tenants import TenantLedger

# Retry-After when the model's speed is not known yet (no worker has measured it).
UNKNOWN_SPEED_RETRY_S = 30


class TenantQuota:
    def __init__(self, ledger: TenantLedger, limit: int, registry: ModelRegistry) -> None:
        self._ledger = ledger
        self._registry = registry
        self.limit = limit

    def over_limit(self, images: int) -> ApiError:
        """400: the work alone is more than the key may ever have queued."""
        return ApiError(
            ErrorCode.EXCEEDS_KEY_QUOTA,
            f"{images} images are more than this API key may have queued at once ({self.limit}); send them in parts of at most {self.limit}",
            param="input",
        )

    def exceeded(self, images: int, queued: int, per_image: float) -> ApiError:
        """429: the key's unfinished work (``queued`` images) leaves no room for ``images`` more."""
        # Room comes back as the key's images finish, at about the model's speed.
        retry = math.ceil((queued + images - self.limit) * per_image) if per_image > 0 else UNKNOWN_SPEED_RETRY_S
        return ApiError(
            ErrorCode.KEY_QUOTA_EXCEEDED,
            f"this API key has {queued} images queued or in progress; {images} more would exceed its limit of {self.limit}; retry when some have finished",
            headers={"Retry-After": str(max(1, retry))},
        )

    async def admit(self, key_id: str, model: str, work_id: str, images: int, expires_at: float) -> None:
        """Count ``images`` against the key until released, or until ``expires_at`` at the latest;
        400 when they alone exceed the limit, 429 when the key's unfinished work leaves no room."""
        if images > self.limit:
            raise self.over_limit(images)
        admitted, queued = await self._ledger.admit(key_id, work_id, images, self.limit, expires_at)
        if not admitted:
            raise self.exceeded(images, queued, await self._registry.seconds_per_image(model))

    async def release(self, key_id: str, work_id: str) -> None:
        await self._ledger.release(key_id, work_id)
