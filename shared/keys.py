"""Names of the Redis keys of synchronous requests, workers and models (Celery's own queues are named
in ``queues``; jobs and tenants' quotas in their stores, ``shared.store.jobs`` and ``shared.store.tenants``;
Batch API files and batches in ``api.files`` and ``api.batches``)."""

from __future__ import annotations

from dataclasses import dataclass

from shared.queues import model_slug


@dataclass(frozen=True)
class Keys:
    prefix: str

    def reply(self, work_id: str) -> str:
        """List the worker pushes one synchronous request's results onto."""
        return f"{self.prefix}reply:{work_id}"

    def blobs(self, work_id: str) -> str:
        """Hash: input index -> image bytes of one request, stored by the API for the worker."""
        return f"{self.prefix}blobs:{work_id}"

    def abandoned(self, reply_key: str) -> str:
        """Set by the API when it stopped waiting, so workers skip the work."""
        return f"{self.prefix}abandoned:{reply_key}"

    def claim(self, reply_key: str) -> str:
        """Name of the worker that started a synchronous request, so the API can send the request
        again when that worker stops heartbeating before its deadline."""
        return f"{self.prefix}claim:{reply_key}"

    def model_workers(self, model_id: str) -> str:
        """Sorted set of worker names serving a model, scored by heartbeat expiry time."""
        return f"{self.prefix}workers:{model_slug(model_id)}"

    def model_speed(self, model_id: str) -> str:
        """Hash: worker name -> seconds per image that worker measured for the model (forward pass per
        image, smoothed), so the API can estimate how long a queue takes to drain."""
        return f"{self.prefix}speed:{model_slug(model_id)}"

    def admitted(self, model_id: str) -> str:
        """Sorted set: synchronous requests admitted for a model and not yet answered, scored by
        deadline (the API's admission ledger)."""
        return f"{self.prefix}admitted:{model_slug(model_id)}"

    def admitted_images(self, model_id: str) -> str:
        """Hash: request -> its image count, plus the running total under ``total``."""
        return f"{self.prefix}admitted-images:{model_slug(model_id)}"

    def model_info(self) -> str:
        """Hash: model id -> ModelInfo JSON, written by workers when they load a model."""
        return f"{self.prefix}model-info"
