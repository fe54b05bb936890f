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

    def blob(self, work_id: str, index: int) -> str:
        """The bytes of one input image, stored by the API for the worker to read."""
        return f"{self.prefix}blob:{work_id}:{index}"

    def abandoned(self, reply_key: str) -> str:
        """Set by the API when it stopped waiting, so workers skip the work."""
        return f"{self.prefix}abandoned:{reply_key}"

    def model_workers(self, model_id: str) -> str:
        """Sorted set of worker names serving a model, scored by heartbeat expiry time."""
        return f"{self.prefix}workers:{model_slug(model_id)}"

    def model_info(self) -> str:
        """Hash: model id -> ModelInfo JSON, written by workers when they load a model."""
        return f"{self.prefix}model-info"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def job_results(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:results"
