"""The Celery application both sides share: broker, routing, acknowledgement policy."""

from __future__ import annotations

from celery import Celery

from shared.broker import broker_connection
from shared.queues import route_by_model
from shared.settings import Settings


def create_celery_app(settings: Settings) -> Celery:
    broker = broker_connection(settings)
    app = Celery("imbeddings", broker=broker.url, set_as_current=True, amqp="shared.task_events:SummarisingAMQP")
    app.conf.update(
        broker_transport=broker.transport,
        task_serializer="json",
        accept_content=["json"],
        # Results are per image and addressed by request or job index, so the worker writes them
        # itself; Celery's one-blob-per-task result backend is not used.
        task_ignore_result=True,
        result_backend=None,
        task_routes=(route_by_model,),
        task_create_missing_queues=True,
        # A message is acknowledged only after its results are stored: a worker killed mid-batch
        # leaves it unacknowledged and the broker hands it to another worker.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # Tasks running when the broker drops finish and store their results (stores are idempotent);
        # their messages, not acknowledged, come back once and are skipped as already done.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # One message reserved per task thread. kombu's Redis transport pops one message per BRPOP
        # whatever the multiplier, so a larger one saves no round trip; it would only hold more
        # requests, unacknowledged, in a worker whose threads are all busy while another idles, and
        # leave more for the visibility timeout to hand out again should that worker die.
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_transport_options={
            # Redelivery of unacknowledged messages happens this long after delivery. Every task is
            # small (one request, or one job chunk), so a short timeout only costs a duplicate
            # delivery of slow work, which results keyed by item index absorb.
            "visibility_timeout": settings.broker_visibility_timeout_s,
            "unacked_restore_interval": 5,
            "unacked_restore_throttle": 1,
            # The restore sweep's lock: a worker killed while holding it must not block the sweep
            # of the others for kombu's default five minutes.
            "unacked_mutex_expire": 30,
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
            "retry_on_timeout": True,
            **broker.transport_options,
        },
        broker_pool_limit=64,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        # Heartbeats and task events are what Flower and `celery events` see the fleet by. Events are
        # Redis PUBLISHes (nothing is stored) whose task arguments are summarised (shared/task_events.py).
        worker_send_task_events=settings.celery_events,
        # "task-sent" from the API would double its cost of publishing a task (README, Celery's tools),
        # for a view of queued work that the queue-depth metrics already give.
        task_send_sent_event=False,
    )
    return app
