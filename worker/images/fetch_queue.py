"""The worker's fetch threads, shared fairly between requests.

Each request (or job chunk) has at most ``per_request`` of its URLs queued, in flight or fetched and
not yet taken; the next one is queued when a body is taken, behind the other requests' URLs. So a request with 256
URLs to a server that never answers holds ``per_request`` threads, not all of them, and a one-URL
request that arrives meanwhile is fetched at once. Before each URL starts, the request is asked
whether it was withdrawn (client gone, deadline passed, job cancelled); if so its remaining URLs fail
at once instead of being fetched for nobody.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from shared.errors import ErrorCode
from worker.errors import ImageInputError
from worker.images.fetch import Fetcher
from worker.tickets import Withdrawn

log = logging.getLogger(__name__)

# A withdrawal check is a Redis round trip; fetches of one request share its answer for this long.
WITHDRAWAL_CHECK_INTERVAL_S = 0.5
_STOPPING = ImageInputError(ErrorCode.WORKER_STOPPING, "the worker stopped before this URL was fetched")


class Withdrawal:
    """Whether a request was withdrawn, looked up at most once per interval. Fetch threads that find a
    lookup due wait for it, so none starts on a stale "no". A lookup that fails counts as not
    withdrawn: the fetch goes on, and the request's own reply path deals with the broken store."""

    def __init__(self, check: Callable[[], bool], interval_s: float = WITHDRAWAL_CHECK_INTERVAL_S) -> None:
        self._check = check
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._checked_at = float("-inf")
        self._withdrawn = False

    def __call__(self) -> bool:
        with self._lock:
            now = time.monotonic()
            if not self._withdrawn and now - self._checked_at >= self._interval_s:
                try:
                    self._withdrawn = bool(self._check())
                except Exception as exc:
                    log.warning("could not look up whether a request was withdrawn", extra={"error": f"{type(exc).__name__}: {exc}"})
                self._checked_at = time.monotonic()
            return self._withdrawn


class FetchQueue:
    def __init__(self, pool: ThreadPoolExecutor, fetcher: Fetcher, per_request: int) -> None:
        self.fetcher = fetcher
        self.pool = pool
        self.per_request = per_request

    def fetch_all(self, urls: list[str], withdrawn: Callable[[], bool]) -> RequestFetches:
        """Start fetching ``urls``; take their bodies in order with ``next_body()``."""
        return RequestFetches(self, urls, Withdrawal(withdrawn))


class RequestFetches:
    """One request's URLs, fed to the shared pool so that at most ``per_request`` of them are in
    flight or fetched and not yet taken: a slot frees when its body is taken, which also bounds the
    bytes a request holds here (``per_request`` bodies of at most the image size limit)."""

    def __init__(self, queue: FetchQueue, urls: list[str], withdrawn: Withdrawal) -> None:
        self._queue = queue
        self._withdrawn = withdrawn
        self._lock = threading.Lock()
        self._pending = deque(enumerate(urls))
        self._futures: list[Future[bytes] | None] = [Future() for _ in urls]
        self._taken = 0
        for _ in range(min(queue.per_request, len(urls))):
            self._submit_next()

    def next_body(self) -> bytes:
        """The body of the next URL in order; raises its ``ImageInputError``."""
        index = self._taken
        future = self._futures[index]
        assert future is not None
        self._taken += 1
        try:
            return future.result()
        finally:
            self._futures[index] = None
            self._submit_next()

    def _submit_next(self) -> None:
        with self._lock:
            if not self._pending:
                return
            index, url = self._pending.popleft()
        try:
            queued = self._queue.pool.submit(self._run, index, url)
        except RuntimeError:  # the pool was shut down: the worker is stopping
            self._fail_pending(_STOPPING, index)
            return
        queued.add_done_callback(lambda done: self._fail_pending(_STOPPING, index) if done.cancelled() else None)

    def _run(self, index: int, url: str) -> None:
        future = self._futures[index]
        assert future is not None
        try:
            if self._withdrawn():
                withdrawn = ImageInputError(
                    Withdrawn.CODE, "the request was withdrawn (client gone, deadline passed or job cancelled) before this URL was fetched"
                )
                self._fail_pending(withdrawn, index)
                return
            future.set_result(self._queue.fetcher.fetch(url, self._withdrawn))
        except ImageInputError as exc:
            future.set_exception(exc)
        except Exception as exc:  # whatever a URL trips over is that URL's error, never the request's
            future.set_exception(ImageInputError(ErrorCode.URL_FETCH_FAILED, f"URL fetch failed: {type(exc).__name__}: {exc}"))

    def _fail_pending(self, error: ImageInputError, current: int) -> None:
        with self._lock:
            failed = [current, *(index for index, _ in self._pending)]
            self._pending.clear()
        for index in failed:
            future = self._futures[index]
            if future is not None:
                future.set_exception(error)
