"""One bad input, or one broken chunk, cannot take other work down, through the real service.

Inputs the fetcher trips over (an IDNA-invalid host, a redirect to one) become errors of their own
index; a job chunk that fails as a whole is tried a bounded number of times and then its items fail
in place, so the job completes; a request whose task fails still gets an answer.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis

from shared.celery_app import create_celery_app
from shared.protocol import BlobRef, EmbedPayload, JobChunkPayload
from shared.queues import EMBED_TASK, JOB_CHUNK_TASK
from shared.settings import Settings
from shared.store.jobs import CREATE, JobKeys, JobRecord, new_job_id
from shared.store.requests import RequestKeys
from tests.support.images import ImageServer
from tests.support.jobs import all_results, submit, wait_done
from tests.support.stack import IMAGE_HOST, Stack

LONG_LABEL = "a" * 64
# Hosts no DNS name can have (a label over 63 characters, an empty label): refused before any lookup,
# so nothing leaves the machine.
POISON_URLS = [
    f"http://{LONG_LABEL}.example/x.png",
    f"http://bücher.{LONG_LABEL}.example/x.png",
    "http://a..b/x.png",
]
JOB_KEYS = JobKeys("imb:")


class _RedirectToPoison(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(302)
        self.send_header("Location", f"http://bücher.{LONG_LABEL}.example/x.png")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def poison_redirect() -> Iterator[str]:
    server = ThreadingHTTPServer((IMAGE_HOST, 0), _RedirectToPoison)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://{IMAGE_HOST}:{server.server_address[1]}/moved.jpg"
    finally:
        server.shutdown()
        server.server_close()


def _is_url_error(item: dict) -> bool:
    error = item.get("error") or {}
    return error.get("type") == "invalid_request_error" and (error.get("code", "").startswith("url_") or error.get("code") == "invalid_url")


def test_urls_the_fetcher_trips_over_fail_only_their_item(service: Stack, image_server: ImageServer, poison_redirect: str) -> None:
    names = ("cmp1.jpg", "cmp2.jpg", "cmp3.png", "cmp4.png", "img.webp")
    inputs = [image_server.url(names[i % len(names)]) for i in range(36)]
    poisoned = {3: POISON_URLS[0], 7: POISON_URLS[1], 12: POISON_URLS[2], 20: poison_redirect, 33: POISON_URLS[1]}
    for index, url in poisoned.items():
        inputs[index] = url
    with service.client() as client:
        job = submit(client, {"input": inputs})
        state = wait_done(client, job["id"], timeout_s=180)
        assert (state["status"], state["completed"], state["failed"]) == ("completed", 36 - len(poisoned), len(poisoned)), state
        items = all_results(client, job["id"])
        assert [item["index"] for item in items] == list(range(36))
        for item in items:
            if item["index"] in poisoned:
                assert _is_url_error(item) and "embedding" not in item, item
            else:
                assert "embedding" in item, item
        print("job errors:", {item["index"]: item["error"]["message"][:90] for item in items if item["index"] in poisoned})

        for url in [*POISON_URLS, poison_redirect]:
            started = time.monotonic()
            answer = client.post("/v1/embeddings", json={"input": [image_server.url("cmp1.jpg"), url]})
            error = answer.json()["error"]
            print(f"sync with {url[:40]}...: {answer.status_code} in {time.monotonic() - started:.2f} s: {error['code']}: {error['message'][:90]}")
            assert answer.status_code == 400 and error["param"] == "input[1]" and _is_url_error({"error": error}), answer.text[:300]
        # The worker is unharmed and serves the next request.
        assert client.post("/v1/embeddings", json={"input": image_server.url("cmp2.jpg")}).status_code == 200
        assert service.worker.alive()


def _publish(service: Stack, name: str, payload: dict) -> None:
    app = create_celery_app(Settings(redis_url=service.env["IMBEDDINGS_REDIS_URL"]))
    try:
        app.send_task(name, kwargs={"payload": payload})
    finally:
        app.close()


def test_a_chunk_that_always_fails_is_tried_a_bounded_number_of_times_then_its_items_fail(service: Stack) -> None:
    """A chunk whose image-bytes key holds the wrong type makes every try raise (WRONGTYPE) outside
    any one item: tried 3 more times, then its 4 items fail in place and the job completes."""
    store = redis.Redis.from_url(service.env["IMBEDDINGS_REDIS_URL"])
    model = service.model("dinov2-tiny")
    job = JobRecord(id=new_job_id(), status="queued", model=model, total=4, created_at=int(time.time()))
    fields = [item for pair in job.to_redis().items() for item in pair]
    store.register_script(CREATE)(keys=[JOB_KEYS.job(job.id), JOB_KEYS.counts()], args=[600, *fields])
    broken = f"imb:test-broken-blobs:{job.id}"
    store.set(broken, b"not a hash", ex=600)
    refs = [BlobRef(index=i, blob_key=broken) for i in range(4)]
    _publish(service, JOB_CHUNK_TASK, JobChunkPayload(request_id=f"poison-{job.id}", job_id=job.id, model=model, items=refs).model_dump())

    with service.client() as client:
        state = wait_done(client, job.id, timeout_s=120)
        assert (state["status"], state["completed"], state["failed"]) == ("completed", 0, 4), state
        items = all_results(client, job.id)
        assert [item["index"] for item in items] == [0, 1, 2, 3]
        for item in items:
            assert item["error"]["code"] == "chunk_failed" and item["error"]["type"] == "server_error"
            assert "4 times" in item["error"]["message"] and "WRONGTYPE" in item["error"]["message"]
        print("item error:", items[0]["error"]["message"])
    log = service.worker.log_text()
    retries = [line for line in log.splitlines() if job.id in line and "job chunk failed; it will be tried again" in line]
    assert len(retries) == 3
    assert sum(job.id in line and "job chunk failed on every try" in line for line in log.splitlines()) == 1
    assert service.worker.alive()


def test_a_request_whose_task_fails_still_gets_an_answer(service: Stack) -> None:
    """The same broken key under a synchronous request: the waiting side gets every image's error at
    once, not a timeout."""
    store = redis.Redis.from_url(service.env["IMBEDDINGS_REDIS_URL"])
    model = service.model("dinov2-tiny")
    work = new_job_id()
    broken = f"imb:test-broken-blobs:{work}"
    store.set(broken, b"not a hash", ex=600)
    reply_key = RequestKeys("imb:").reply(work)
    payload = EmbedPayload(
        request_id=f"poison-{work}",
        model=model,
        items=[BlobRef(index=i, blob_key=broken) for i in range(2)],
        reply_key=reply_key,
        deadline=time.time() + 60,
    )
    _publish(service, EMBED_TASK, payload.model_dump())
    popped = store.blpop([reply_key], timeout=60)
    assert popped is not None
    results = json.loads(popped[1])
    assert [result["index"] for result in results] == [0, 1]
    assert all(result["error"]["code"] == "worker_error" and "WRONGTYPE" in result["error"]["message"] for result in results)
    assert service.worker.alive()
