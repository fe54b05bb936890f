"""Per-key quota: how many images one API key may have queued or in flight, requests and jobs
together (``IMBEDDINGS_KEY_MAX_QUEUED_IMAGES``), so one tenant cannot fill the queue for all."""

from __future__ import annotations

import math

from api.admission import AdmissionLedger
from api.errors import ApiError
from shared.errors import ErrorCode
from shared.store.tenants import TenantLedger

# Retry-After when the model's speed is not known yet (no worker has measured it).
UNKNOWN_SPEED_RETRY_S = 30


class TenantQuota:
    def __init__(self, ledger: TenantLedger, limit: int, speeds: AdmissionLedger) -> None:
        self._ledger = ledger
        self._speeds = speeds
        self.limit = limit

    async def admit(self, key_id: str, model: str, work_id: str, images: int, expires_at: float) -> None:
        """Count ``images`` against the key until released, or until ``expires_at`` at the latest;
        400 when they alone exceed the limit, 429 when the key's unfinished work leaves no room."""
        if images > self.limit:
            raise ApiError(
                ErrorCode.EXCEEDS_KEY_QUOTA,
                f"{images} images are more than this API key may have queued at once ({self.limit}); send them in parts of at most {self.limit}",
                param="input",
            )
        admitted, queued = await self._ledger.admit(key_id, work_id, images, self.limit, expires_at)
        if admitted:
            return
        # Room comes back as the key's images finish, at about the model's speed.
        per_image = await self._speeds.seconds_per_image(model)
        retry = math.ceil((queued + images - self.limit) * per_image) if per_image > 0 else UNKNOWN_SPEED_RETRY_S
        raise ApiError(
            ErrorCode.KEY_QUOTA_EXCEEDED,
            f"this API key has {queued} images queued or in progress; {images} more would exceed its limit of {self.limit}; retry when some have finished",
            headers={"Retry-After": str(max(1, retry))},
        )

    async def release(self, key_id: str, work_id: str) -> None:
        await self._ledger.release(key_id, work_id)
