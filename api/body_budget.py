"""The process-wide budget of request body bytes held in memory (``IMBEDDINGS_MAX_BUFFERED_BYTES``).

The API runs on one event loop, so the counts need no lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from api import metrics
from api.errors import ApiError
from shared.errors import ErrorCode

# A body refused for want of room is worth retrying soon: most bodies in flight are parsed and answered within seconds.
BUSY_RETRY_AFTER_S = 2


class BodyBudget:
    """Bytes of request bodies the process holds, against a cap shared by every request in flight.

    A body's bytes are counted from the moment they are expected (its Content-Length, or each chunk
    of a chunked upload as it arrives) until its request has been answered: the parsed request,
    its decoded images and the body itself live that long. A body read as it arrives (a job's)
    counts only the part of it the API holds at a time (``BodyHold.resize``).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def reserve(self, size: int) -> bool:
        if self.held + size > self.limit:
            return False
        self.held += size
        metrics.BUFFERED_BODY_BYTES.set(self.held)
        return True

    def refusal(self, size: int) -> ApiError:
        """The 429 for a body of ``size`` bytes (so far, or declared) that does not fit."""
        message = (
            f"the server is receiving too many request bodies at once ({self.held} bytes held, limit {self.limit}); "
            f"this one ({size} bytes so far or declared) does not fit now: retry after {BUSY_RETRY_AFTER_S} s"
        )
        return ApiError(ErrorCode.TOO_MANY_BYTES_IN_FLIGHT, message, headers={"Retry-After": str(BUSY_RETRY_AFTER_S)})

    def release(self, size: int) -> None:
        self.held -= size
        metrics.BUFFERED_BODY_BYTES.set(self.held)

    @contextmanager
    def hold(self) -> Iterator[BodyHold]:
        """One request's share, released when the block ends, however it ends."""
        hold = BodyHold(self)
        try:
            yield hold
        finally:
            self.release(hold.size)


class BodyHold:
    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.size = 0

    def grow_to(self, size: int) -> bool:
        """Hold ``size`` bytes in all; False, holding what it held, when the budget has no room."""
        if size <= self.size:
            return True
        return self.resize(size)

    def resize(self, size: int) -> bool:
        """Hold ``size`` bytes in all, fewer or more; False, holding what it held, when growing finds no room."""
        if size > self.size and not self.budget.reserve(size - self.size):
            return False
        if size < self.size:
            self.budget.release(self.size - size)
        self.size = size
        return True
