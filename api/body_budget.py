"""The process-wide budget of request body bytes held in memory (``IMBEDDINGS_MAX_BUFFERED_BYTES``).

The API runs on one event loop, so the counts need no lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from api import metrics


class BodyBudget:
    """Bytes of request bodies the process holds, against a cap shared by every request in flight.

    A body's bytes are counted from the moment they are expected (its Content-Length, or each chunk
    of a chunked upload as it arrives) until its request has been answered: the parsed request,
    its decoded images and the body itself live that long.
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
        if not self.budget.reserve(size - self.size):
            return False
        self.size = size
        return True
