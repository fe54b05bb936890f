"""Celery's consumer as the worker runs it (``worker_consumer``): task events published in batches.

Celery buffers a worker's task events (``task-received``, ``task-started``, ``task-succeeded``) and
its consumer asks the event loop to publish the buffer as soon as an event is added: under load that
is one Redis PUBLISH per event, three per task, each built by kombu's producer, and one wake-up of the
event loop per event sent from a task thread. Here the buffer is published every
``EVENT_FLUSH_INTERVAL_S`` instead, or as soon as Celery's ``buffer_limit`` (24) events wait, as one
``task.multi`` message: the form Celery's own event receivers (Flower, ``celery events``) read.
"""

from __future__ import annotations

from typing import Any

from celery.worker.consumer import Consumer

# How late Flower and ``celery events`` may see a task event. Their views refresh about once a second
# and worker heartbeats come every two; a tenth of a second is not noticed there, and at a few
# hundred tasks a second it already puts every 24 events (the buffer limit) in one PUBLISH.
EVENT_FLUSH_INTERVAL_S = 0.1


class EventBatchingConsumer(Consumer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.hub is not None:
            self.hub.call_repeatedly(EVENT_FLUSH_INTERVAL_S, self._flush_events)

    def on_send_event_buffered(self) -> None:
        """Left to the timer (Celery's own flushes at once)."""

    def shutdown(self) -> None:
        self._flush_events()  # what is buffered still goes out before the dispatcher closes
        super().shutdown()
