"""Whether the client of a piece of work still wants it.

A task hands the pipeline one ticket for its images. The pipeline looks at it before it spends
anything on an image (before fetching or decoding it) and when a batch is formed, so the images of
a request whose client left, or whose deadline passed, or of a cancelled job, are dropped rather than
computed. The batch thread refreshes the tickets of the batch it is about to run from Redis in one
round trip (``ResultStore.mark_withdrawn``); the fetch stage asks ``withdrawn_now()`` (its own
Redis lookup, rate-limited by the fetch queue) before each URL.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from shared.errors import ErrorCode
from worker.errors import ImageInputError


@dataclass(eq=False)
class Ticket:
    reply_key: str | None = None  # a synchronous request's reply list; job chunks have none
    deadline: float = math.inf  # epoch seconds
    lookup: Callable[[], bool] | None = None  # asks Redis whether the work was withdrawn
    withdrawn: bool = False

    def wanted(self) -> bool:
        return not self.withdrawn and time.time() < self.deadline

    def withdrawn_now(self) -> bool:
        """Not wanted any more, looked up in Redis unless already known."""
        if self.wanted() and self.lookup is not None and self.lookup():
            self.withdrawn = True
        return not self.wanted()


# Marks the tickets whose request the API has withdrawn; called with tickets that have a reply key.
WithdrawalCheck = Callable[[list[Ticket]], None]


class Withdrawn(ImageInputError):
    """The image's request was withdrawn (client gone, deadline passed) before the model took it."""

    CODE = ErrorCode.REQUEST_WITHDRAWN  # the fetch stage reports its withdrawn URLs with it too

    def __init__(self) -> None:
        super().__init__(self.CODE, "the request was withdrawn before this image was embedded")
