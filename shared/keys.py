"""Names of the Redis keys of jobs, tenants, files and batches.

The other structures name their keys in their owner module: ``shared.store.requests`` (a
synchronous request's image bytes, reply and withdrawal flag), ``shared.store.claims``,
``shared.store.registry`` (the worker registry), ``shared.store.admission``; Celery's queues are named in ``shared.queues``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str

    def file(self, file_id: str) -> str:
        """Hash: a Batch API file's record fields plus its bytes under ``content``."""
        return f"{self.prefix}file:{file_id}"

    def batch(self, batch_id: str) -> str:
        """Hash: a Batch API batch's record (its lines and their jobs as JSON)."""
        return f"{self.prefix}batch:{batch_id}"

    def owner_batches(self, owner: str) -> str:
        """Sorted set: the batch ids one API key created, scored by creation time."""
        return f"{self.prefix}batches:{owner}"

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
