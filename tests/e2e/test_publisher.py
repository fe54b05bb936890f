"""The API's publisher frames tasks exactly as Celery's ``send_task`` does through kombu's Redis transport."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from typing import Any

import redis
import redis.asyncio

from api.publisher import TaskPublisher
from devtools.redis_server import RedisServer
from shared.celery_app import create_celery_app
from shared.queues import EMBED_REQUESTS_TASK, EMBED_TASK, JOB_CHUNK_TASK, queue_for
from shared.settings import Settings

# What differs between any two messages of the same task: ids, delivery tags and the sender's name.
PER_MESSAGE = {"id", "root_id", "correlation_id", "delivery_tag", "origin"}


def _comparable(raw: bytes) -> dict[str, Any]:
    message = json.loads(raw)
    message["body"] = json.loads(base64.b64decode(message["body"]))
    for section in (message["headers"], message["properties"]):
        for key in PER_MESSAGE & section.keys():
            section[key] = type(section[key]).__name__
    return message


def test_published_message_matches_celery_send_task(redis_server: RedisServer) -> None:
    settings = Settings(redis_url=redis_server.url)
    celery = create_celery_app(settings)
    client = redis.Redis.from_url(redis_server.url)
    # A model per task, so each queue holds the two messages of one task.
    models = {name: f"publisher-{uuid.uuid4().hex[:8]}" for name in (EMBED_TASK, EMBED_REQUESTS_TASK, JOB_CHUNK_TASK)}
    url = {"index": 0, "kind": "url", "data": "https://example.test/a.jpg?token=secret"}
    request = {"request_id": "r1", "model": models[EMBED_REQUESTS_TASK], "items": [url], "reply_key": "reply:1", "deadline": 1.0}
    payloads = {
        EMBED_TASK: {"request_id": "r1", "model": models[EMBED_TASK], "items": [url]},
        EMBED_REQUESTS_TASK: {"model": models[EMBED_REQUESTS_TASK], "requests": [request, {**request, "request_id": "r2"}]},
        JOB_CHUNK_TASK: {"request_id": "r2", "job_id": "j", "model": models[JOB_CHUNK_TASK], "items": [{"index": 3, "kind": "blob", "data": "k"}]},
    }

    async def publish_fast() -> None:
        async_client = redis.asyncio.Redis.from_url(redis_server.url)
        try:
            publisher = TaskPublisher(celery, async_client)
            for name, payload in payloads.items():
                await publisher.publish(name, [payload])
        finally:
            await async_client.aclose()

    try:
        for name, payload in payloads.items():
            celery.send_task(name, kwargs={"payload": payload})
        asyncio.run(publish_fast())
        for name, kind in ((EMBED_TASK, "interactive"), (EMBED_REQUESTS_TASK, "interactive"), (JOB_CHUNK_TASK, "bulk")):
            # LPUSH: the newest message is first, so [fast, celery].
            fast, reference = client.lrange(queue_for(models[name], kind), 0, -1)
            assert _comparable(fast) == _comparable(reference), name
            assert json.loads(fast)["headers"]["task"] == name
            assert "secret" not in fast.decode()  # the arguments' repr in the headers is the summary
        summary = json.loads(client.lindex(queue_for(models[EMBED_REQUESTS_TASK], "interactive"), 0))["headers"]["kwargsrepr"]
        assert "'request_ids': ['r1', 'r2']" in summary and "'images': 2" in summary, summary
    finally:
        celery.close()
        client.close()
