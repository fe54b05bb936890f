"""Whether the client of a piece of work still wants it.

A task hands the pipeline one ticket for its images. The pipeline looks at it before it spends
anything on an image (before fetching or decoding it) and when a batch is formed, so the images of
a request whose client left, or whose deadline passed, or of a cancelled job, are dropped rather than
computed. The batch thread refreshes the tickets of the batch it is about to run from Redis in one
round trip (``ResultStore.mark_withdrawn``), skipping those looked up within the last
``LOOKUP_FRESH_S``; the fetch stage asks ``withdrawn_now()`` (its own Redis lookup, rate-limited by
the fetch queue) before each URL.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from shared.errors import ErrorCode
from worker.errors import ImageInputError

# A ticket looked up in Redis this recently is not looked up again when its batch is formed: a
# one-image request's batch usually forms a millisecond after the task's own lookup, and a second
# round trip then would cost more than the rare withdrawal it catches (its image is computed, its
# result discarded). Work that waited longer in the worker is looked up again.
LOOKUP_FRESH_S = 0.05


@dataclass(eq=False)
class Ticket:
    reply_key: str | None = None  # a synchronous request's reply list; job chunks have none
    deadline: float = math.inf  # epoch seconds
    lookup: Callable[[], bool] | None = None  # asks Redis whether the work was withdrawn
    withdrawn: bool = False
    looked_up_at: float = -math.inf  # time.monotonic() of the last lookup in Redis

    def wanted(self) -> bool:
        return not self.withdrawn and time.time() < self.deadline

    def lookup_due(self) -> bool:
        return time.monotonic() - self.looked_up_at >= LOOKUP_FRESH_S

    def withdrawn_now(self) -> bool:
        """Not wanted any more, looked up in Redis unless already known."""
        if self.wanted() and self.lookup is not None:
            self.looked_up_at = time.monotonic()
            if self.lookup():
                self.withdrawn = True
        return not self.wanted()


# Marks the tickets whose request the API has withdrawn; called with tickets that have a reply key.
WithdrawalCheck = Callable[[list[Ticket]], None]


class Withdrawn(ImageInputError):
    """The image's request was withdrawn (client gone, deadline passed) before the model took it."""

    CODE = ErrorCode.REQUEST_WITHDRAWN  # the fetch stage reports its withdrawn URLs with it too

    def __init__(self) -> None:
        super().__init__(self.CODE, "the request was withdrawn before this image was embedded")
