"""Celery queue and task names, derived from model ids the same way on both sides.

The one module that knows a queue is a Redis list (kombu's layout): depths are read here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from typing import Any, Literal

import redis.asyncio
from redis.asyncio.client import Pipeline as AsyncPipeline

EMBED_TASK = "imbeddings.embed"
EMBED_REQUESTS_TASK = "imbeddings.embed_requests"
JOB_CHUNK_TASK = "imbeddings.embed_job_chunk"

QueueKind = Literal["interactive", "bulk"]
QUEUE_KINDS: tuple[QueueKind, ...] = ("interactive", "bulk")

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def model_slug(model_id: str) -> str:
    """A Redis- and Celery-safe name for a model id (Hub id or filesystem path).

    The hash keeps two ids that sanitise to the same text (``a/b`` and ``a_b``) apart.
    """
    readable = _UNSAFE.sub("_", model_id).strip("_.")[-48:] or "model"
    digest = hashlib.sha1(model_id.encode("utf-8")).hexdigest()[:8]
    return f"{readable}-{digest}"


def queue_for(model_id: str, kind: QueueKind) -> str:
    base = f"imbeddings.{model_slug(model_id)}"
    return base if kind == "interactive" else f"{base}.bulk"


async def queue_depth(redis: redis.asyncio.Redis, model_id: str, kind: QueueKind) -> int:
    """Tasks waiting in one of the model's queues."""
    return int(await redis.llen(queue_for(model_id, kind)))


def count_queued(pipe: AsyncPipeline, model_id: str) -> None:
    """Queue the depth of each of the model's queues on ``pipe``, in ``QUEUE_KINDS`` order."""
    for kind in QUEUE_KINDS:
        pipe.llen(queue_for(model_id, kind))


def route_by_model(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], options: dict[str, Any], task: Any = None, **_: Any) -> dict[str, str] | None:
    """Celery router: every task carries its model, and each model has its own queues."""
    payload = kwargs.get("payload") or {}
    model = payload.get("model")
    if not model:
        return None
    if name in (EMBED_TASK, EMBED_REQUESTS_TASK):
        return {"queue": queue_for(model, "interactive")}
    if name == JOB_CHUNK_TASK:
        return {"queue": queue_for(model, "bulk")}
    return None


def main(argv: list[str] | None = None) -> None:
    """``python -m shared.queues MODEL...``: the Redis lists holding each model's tasks, for manifests
    (KEDA's ``listName``) and for looking at a queue by hand (``redis-cli LLEN``)."""
    parser = argparse.ArgumentParser(prog="python -m shared.queues", description="Print the Celery queue (Redis list) names of models.")
    parser.add_argument("models", nargs="+", metavar="MODEL", help="model id, as in IMBEDDINGS_WORKER_MODELS")
    parser.add_argument("--kind", choices=["interactive", "bulk"], help="print only this queue's name, one line per model")
    args = parser.parse_args(argv)
    for model in args.models:
        if args.kind:
            print(queue_for(model, args.kind))
        else:
            print(json.dumps({"model": model, "interactive": queue_for(model, "interactive"), "bulk": queue_for(model, "bulk")}))


if __name__ == "__main__":
    main()
