"""Names of the Redis keys Imbeddings writes (Celery's own queues are named in ``queues``)."""

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

    def file(self, file_id: str) -> str:
        """Hash: a Batch API file's record fields plus its bytes under ``content``."""
        return f"{self.prefix}file:{file_id}"

    def batch(self, batch_id: str) -> str:
        """Hash: a Batch API batch's record (its lines and their jobs as JSON)."""
        return f"{self.prefix}batch:{batch_id}"

    def owner_batches(self, owner: str) -> str:
        """Sorted set: the batch ids one API key created, scored by creation time."""
        return f"{self.prefix}batches:{owner}"

    def model_info(self) -> str:
        """Hash: model id -> ModelInfo JSON, written by workers when they load a model."""
        return f"{self.prefix}model-info"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def job_results(self, job_id: str) -> str:
        """Hash: item index -> ItemResult JSON."""
        return f"{self.prefix}job:{job_id}:results"

    def job_blobs(self, job_id: str) -> str:
        """Hash: item index -> image bytes not yet embedded."""
        return f"{self.prefix}job:{job_id}:blobs"

    def job_counts(self) -> str:
        """Hash: job status -> number of jobs (queued/running now; completed/cancelled so far)."""
        return f"{self.prefix}job-counts"

    def tenant_work(self, key_id: str) -> str:
        """Sorted set: an API key's unfinished work (synchronous requests and jobs) -> the time its
        claim on the key's quota lapses by itself (a request's deadline, a job's expiry)."""
        return f"{self.prefix}tenant:{key_id}:work"

    def tenant_images(self, key_id: str) -> str:
        """Hash: work id -> images of it not finished yet, plus the key's sum under ``total``."""
        return f"{self.prefix}tenant:{key_id}:images"
