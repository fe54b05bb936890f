"""How long this worker's model takes per image, as the API's admission needs it.

The batch thread reports every forward pass (images, seconds); the heartbeat publishes the smoothed
seconds per image in the worker registry (``shared.store.registry``) with each beat, and the API
turns the images queued ahead of a request into an expected wait with it (``api/admission.py``).
"""

from __future__ import annotations

import threading

# Weight of the newest batch: a few batches move the estimate, one odd batch does not.
SMOOTHING = 0.2


class SpeedMeter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds_per_image: dict[str, float] = {}

    def observe(self, model: str, images: int, seconds: float) -> None:
        sample = seconds / images
        with self._lock:
            previous = self._seconds_per_image.get(model)
            self._seconds_per_image[model] = sample if previous is None else previous + SMOOTHING * (sample - previous)

    def snapshot(self) -> dict[str, float]:
        """Seconds per image by model, for the models that have run a batch."""
        with self._lock:
            return dict(self._seconds_per_image)
