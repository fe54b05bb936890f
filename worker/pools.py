"""The threads and subprocesses a worker process's models share, sized by its ``ThreadBudget``.

URLs are fetched on I/O threads (a fair share of them per request), images are decoded in budgeted
subprocesses and preprocessed on threads that run torch single-threaded, and the models load and run
on one compute thread (``worker.model.compute`` says why only one).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from shared.settings import Settings
from worker.cpu_budget import ThreadBudget
from worker.images.connections import ConnectionPool
from worker.images.decode_pool import DecodePool
from worker.images.fetch import Fetcher
from worker.images.fetch_queue import FetchQueue
from worker.images.limits import InputLimits
from worker.model.compute import compute_executor, use_one_torch_thread


class WorkerPools:
    def __init__(self, settings: Settings, budget: ThreadBudget, limits: InputLimits) -> None:
        self.fetch_threads = ThreadPoolExecutor(max_workers=budget.fetch_threads, thread_name_prefix="fetch")
        self.connections = ConnectionPool(settings.url_idle_connections)
        self.fetches = FetchQueue(self.fetch_threads, Fetcher(limits.fetch, self.connections), settings.url_fetch_concurrency_per_request)
        self.prep = ThreadPoolExecutor(max_workers=budget.preprocess_threads, thread_name_prefix="prep", initializer=use_one_torch_thread)
        # One decode subprocess per preprocessing thread: a thread never waits for a free one.
        self.decode = DecodePool(budget.preprocess_threads, settings.decode_cpu_seconds, settings.decode_max_bytes)
        self.compute = compute_executor()

    def stop(self) -> None:
        self.fetch_threads.shutdown(wait=False, cancel_futures=True)
        self.connections.close()
        self.prep.shutdown(wait=False, cancel_futures=True)
        self.decode.close()
        self.compute.shutdown(wait=False)
