"""Publish Celery tasks from the event loop: one pipelined LPUSH on the API's asyncio Redis client.

kombu is synchronous, so publishing through it cost every request a hop to a worker thread and
kombu's own bookkeeping (py-spy: a fifth of the API's CPU for a one-image request). The message is
still Celery's own: ``app.amqp.create_task_message`` builds the task (protocol 2, routed by the
app's router, arguments summarised as ``shared.task_events`` does), and it is framed exactly as
kombu's Redis transport frames a message sent to the anonymous exchange (a direct-exchange route:
the routing key is the queue, the message is LPUSHed onto the list of that name). Workers consume it
with Celery, unchanged; ``tests/e2e/test_publisher.py`` checks the framing against ``send_task``. The frame
is written by orjson rather than by kombu's encoder (the standard library's ``json``): the same JSON
document, in a fraction of the time, and the frame holds only JSON's own types (Celery's headers and
properties of a task are strings, numbers, lists and None). The task's body (its arguments) is
written by orjson too: the app's serializer is JSON (``shared.celery_app``), and workers read the
same document whichever encoder wrote it.
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

import orjson
import redis.asyncio
from celery import Celery
from redis.asyncio.client import Pipeline as AsyncPipeline

# kombu's default: a message for the anonymous exchange on a queue without priorities.
PRIORITY = 0
PERSISTENT = 2
# Bounded pipelines: a job of many chunks is not one giant command buffer.
PIPELINE_MESSAGES = 256


class TaskPublisher:
    def __init__(self, celery: Celery, redis: redis.asyncio.Redis) -> None:
        if celery.conf.task_serializer != "json":
            raise ValueError(f"the publisher writes JSON task bodies; the Celery app's task_serializer is {celery.conf.task_serializer!r}")
        self._celery = celery
        self._redis = redis
        # The app's router (shared.queues.route_by_model) routes by task name and model alone: one
        # entry per task name and allowed model.
        self._queues: dict[tuple[str, str], str] = {}

    def _queue(self, name: str, kwargs: dict[str, Any]) -> str:
        key = (name, kwargs["payload"]["model"])
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = self._celery.amqp.router.route({}, name, (), kwargs)["queue"].name
        return queue

    def message(self, name: str, payload: dict[str, Any]) -> tuple[str, bytes]:
        """The queue a task goes to and the message kombu's Redis transport would push there."""
        app = self._celery
        kwargs = {"payload": payload}
        queue = self._queue(name, kwargs)
        task_id = str(uuid.uuid4())
        # No task-sent event: the API sends none (README, "Why no task-sent").
        task = app.amqp.create_task_message(task_id, name, (), kwargs, reply_to=app.thread_oid, ignore_result=None)
        properties = {
            **task.properties,
            "delivery_mode": PERSISTENT,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": PRIORITY,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        }
        encoded = base64.b64encode(orjson.dumps(task.body)).decode()
        return queue, orjson.dumps(
            {"body": encoded, "content-encoding": "utf-8", "content-type": "application/json", "headers": task.headers, "properties": properties}
        )

    @staticmethod
    def push(pipe: AsyncPipeline, queue: str, message: bytes) -> None:
        """Queue on ``pipe`` (a caller's transaction or pipeline) the push of a ``message`` onto its ``queue``."""
        pipe.lpush(queue, message)

    async def publish(self, name: str, payloads: list[dict[str, Any]]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for payload in payloads:
            self.push(pipe, *self.message(name, payload))
            if len(pipe) >= PIPELINE_MESSAGES:
                await pipe.execute()
        if len(pipe):
            await pipe.execute()
