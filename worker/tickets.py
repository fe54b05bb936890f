"""Whether the client of a piece of work still wants it.

A task hands the pipeline one ticket for its images. The pipeline looks at it before it spends
anything on an image (before decoding it) and when a batch is formed, so the images of a request
whose client left, or whose deadline passed, are dropped rather than computed. The batch thread
refreshes the tickets of the batch it is about to run from Redis in one round trip
(``ResultStore.mark_withdrawn``); between batches the flag it set is what the decoders see.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from worker.errors import ImageInputError


@dataclass(eq=False)
class Ticket:
    reply_key: str | None = None  # a synchronous request's reply list; job chunks have none
    deadline: float = math.inf  # epoch seconds
    withdrawn: bool = False

    def wanted(self) -> bool:
        return not self.withdrawn and time.time() < self.deadline


# Marks the tickets whose request the API has withdrawn; called with tickets that have a reply key.
WithdrawalCheck = Callable[[list[Ticket]], None]


class Withdrawn(ImageInputError):
    """The image's request was withdrawn (client gone, deadline passed) before the model took it."""

    def __init__(self) -> None:
        super().__init__("request_withdrawn", "the request was withdrawn before this image was embedded")
