"""What Celery's task events say about a task's arguments: a summary, never the images' addresses.

Celery puts a repr of each task's arguments into its message headers, and from there into the
``task-received`` events (and ``task-sent``, were it on) that Flower and ``celery events`` show. A task's payload
lists image URLs, whose query strings may carry signed tokens; the service never logs them, so the
events must not carry them either. The summary keeps what an operator needs: the request or job,
the model and the number of images.
"""

from __future__ import annotations

from typing import Any

from celery.app.amqp import AMQP


def summarise_kwargs(kwargs: dict[str, Any] | None) -> str:
    payload = (kwargs or {}).get("payload")
    if not isinstance(payload, dict):
        return "{}"
    summary: dict[str, Any] = {key: payload[key] for key in ("request_id", "job_id", "model") if key in payload}
    requests = payload.get("requests")
    # A task of requests admitted together (``imbeddings.embed_requests``) names each of them.
    parts = [part for part in requests if isinstance(part, dict)] if isinstance(requests, list) else [payload]
    if isinstance(requests, list):
        summary["request_ids"] = [part.get("request_id") for part in parts]
    summary["images"] = sum(len(part["items"]) for part in parts if isinstance(part.get("items"), list))
    return repr({"payload": summary})


class SummarisingAMQP(AMQP):
    """Celery's message builder, with the arguments' repr replaced by a summary (``Celery(amqp=...)``)."""

    def as_task_v2(self, task_id: str, name: str, args: Any = None, kwargs: Any = None, *more: Any, **options: Any) -> Any:
        options["argsrepr"] = f"<{len(args)} arguments>" if args else "()"
        options["kwargsrepr"] = summarise_kwargs(kwargs)
        return super().as_task_v2(task_id, name, args, kwargs, *more, **options)
