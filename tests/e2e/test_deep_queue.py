"""Load deeper than the model, with the default settings: a real-shape DINOv2-S (random weights) on
the CPU, 64 clients, multi-image requests, clients that give up, and more work than the request
timeout can cover."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devtools.photos import BENCH
from devtools.random_models import build
from tests.support.images import bench_thumbnails, data_uri
from tests.support.stack import SET_FOR_SPEED, private_stack, running_redis

PHOTOS = [path.read_bytes() for path in sorted(BENCH.glob("*.jpg"))]


@dataclass
class DeepQueueStack:
    base_url: str
    worker_metrics: str
    model: str

    def worker_images(self) -> Counter[str]:
        """The worker's images so far, by outcome (embedded, withdrawn, ...)."""
        text = httpx.get(self.worker_metrics, timeout=5).text
        counts: Counter[str] = Counter()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "imbeddings_worker_images_total":
                    counts[sample.labels["outcome"]] += int(sample.value)
        return counts

    def images_through_model(self) -> int:
        """Images the model has computed so far (counted when each batch leaves the model)."""
        text = httpx.get(self.worker_metrics, timeout=5).text
        return sum(
            int(sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "imbeddings_worker_batch_size_sum"
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, allow_list: Path, tiny_models: dict[str, Path]) -> Iterator[DeepQueueStack]:
    root = tmp_path_factory.mktemp("deep-queue")
    model_dir = build("dinov2-small", root / "dinov2-small")
    models_file = root / "models.txt"
    models_file.write_text(f"{model_dir}\n")
    # Only what the test needs to point at its own parts; every limit and timeout is the default.
    models = {**tiny_models, "dinov2-small": model_dir}
    with (
        running_redis(root / "redis") as server,
        private_stack(root, server.url, models_file, models, model="dinov2-small", unset=SET_FOR_SPEED, served_timeout_s=180) as stack,
    ):
        with stack.client() as client:
            assert client.get("/info").json()["settings"]["request_timeout_s"] == 60.0
            assert client.post("/v1/embeddings", json={"input": data_uri(PHOTOS[0])}).status_code == 200
        yield DeepQueueStack(stack.base_url, f"http://127.0.0.1:{stack.worker.env['IMBEDDINGS_WORKER_METRICS_PORT']}/metrics", stack.default_model)


def _post(base_url: str, images: int, offset: int, timeout_s: float = 120, photos: list[bytes] = PHOTOS) -> httpx.Response | str:
    body = {"input": [data_uri(photos[(offset + i) % len(photos)]) for i in range(images)], "encoding_format": "base64"}
    try:
        with httpx.Client(base_url=base_url, timeout=timeout_s) as client:
            return client.post("/v1/embeddings", json=body)
    except httpx.TimeoutException:
        return "gave up"


def _run(base_url: str, clients: int, images: int, timeout_s: float = 120, photos: list[bytes] = PHOTOS) -> tuple[Counter, float]:
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        answers = list(pool.map(lambda n: _post(base_url, images, n, timeout_s, photos), range(clients)))
    statuses = Counter(answer if isinstance(answer, str) else answer.status_code for answer in answers)
    for answer in answers:
        if not isinstance(answer, str) and answer.status_code == 200:
            assert len(answer.json()["data"]) == images
    return statuses, time.monotonic() - started


@pytest.mark.parametrize(("clients", "images"), [(64, 1), (16, 4), (1, 120)], ids=["64x1", "16x4", "1x120"])
def test_a_deep_queue_is_answered_not_refused(stack: DeepQueueStack, clients: int, images: int) -> None:
    statuses, wall = _run(stack.base_url, clients, images)
    print(f"{clients} x {images}: {dict(statuses)} in {wall:.1f} s")
    assert statuses == Counter({200: clients})


# Full-size photos go one request per task; small ones share admission rounds and tasks, and decode
# in no time, so more of them are answered within the second.
@pytest.mark.parametrize(("photos", "most_answered"), [(PHOTOS, 8), (bench_thumbnails(), 24)], ids=["full-size", "small"])
def test_clients_that_give_up_take_their_work_with_them(stack: DeepQueueStack, photos: list[bytes], most_answered: int) -> None:
    before = stack.worker_images()
    statuses, _ = _run(stack.base_url, 48, 1, timeout_s=1.0, photos=photos)
    assert statuses["gave up"] >= 48 - most_answered, statuses
    # How far the model had got when the last client left: what it computes from here on is what
    # was already in its hands then (a batch running, one prepared) and the fresh request's image.
    at_give_up = stack.images_through_model()
    started = time.monotonic()
    fresh = _post(stack.base_url, 1, 0, photos=photos)
    fresh_s = time.monotonic() - started
    assert not isinstance(fresh, str) and fresh.status_code == 200
    time.sleep(2)  # the worker finishes what it had already started
    after = stack.worker_images()
    computed_after = stack.images_through_model() - at_give_up
    embedded = after["embedded"] - before["embedded"]
    withdrawn = after["withdrawn"] - before["withdrawn"]
    print(
        f"48 clients gave up after 1 s: {embedded} of 49 images embedded, {withdrawn} withdrawn, "
        f"{computed_after} computed after they left; the next request took {fresh_s:.2f} s"
    )
    assert computed_after <= 2 * 8 + 1
    assert withdrawn > 0
    assert embedded + withdrawn <= 49


def test_more_work_than_the_timeout_covers_gets_429_with_retry_after(stack: DeepQueueStack) -> None:
    """Ten requests of 120 images: the model needs far more than 60 s for all of them, so those
    that would only time out are refused up front, each with a Retry-After from the queue ahead."""
    with ThreadPoolExecutor(max_workers=10) as pool:
        answers = list(pool.map(lambda n: _post(stack.base_url, 120, n, timeout_s=3.0), range(10)))
    refused = [a for a in answers if not isinstance(a, str) and a.status_code == 429]
    statuses = Counter(a if isinstance(a, str) else a.status_code for a in answers)
    print(f"10 x 120 images: {dict(statuses)}; Retry-After {[r.headers['retry-after'] for r in refused]}")
    assert refused, statuses
    assert set(statuses) <= {429, "gave up"}
    for answer in refused:
        assert answer.json()["error"]["code"] == "queue_full" and "60 s" in answer.json()["error"]["message"]
        assert int(answer.headers["retry-after"]) >= 1


def test_a_request_during_a_running_job_waits_for_about_one_batch_of_it(stack: DeepQueueStack) -> None:
    """Job images hold at most two batches' worth of the worker's pipeline and interactive images go
    first in every batch, so a one-image request passes the job's backlog: while it is answered, the
    job advances by a couple of batches at most, whatever its size."""
    job_images = 200
    with httpx.Client(base_url=stack.base_url, timeout=120) as client:
        body = {"input": [data_uri(PHOTOS[i % len(PHOTOS)]) for i in range(job_images)]}
        job_id = client.post("/v1/jobs", json=body).json()["id"]
        try:
            deadline = time.monotonic() + 120
            while client.get(f"/v1/jobs/{job_id}").json()["completed"] == 0:
                assert time.monotonic() < deadline, "the job never started"
                time.sleep(0.1)
            passed = []
            for n in range(3):
                before = stack.images_through_model()
                started = time.monotonic()
                answer = _post(stack.base_url, 1, n)
                took = time.monotonic() - started
                assert not isinstance(answer, str) and answer.status_code == 200
                # Images embedded meanwhile, this request's included.
                passed.append((stack.images_through_model() - before, round(took, 2)))
            status = client.get(f"/v1/jobs/{job_id}").json()
            print(f"during a {job_images}-image job: (images embedded while waiting, seconds) per request {passed}; job {status['completed']}/{job_images}")
            assert status["status"] == "running", "the job ended before the requests: it was too small to test anything"
            # One batch on the model when the request arrived, one more prepared, then the request's.
            for embedded, _ in passed:
                assert embedded <= 2 * 8 + 8 + 1
        finally:
            client.delete(f"/v1/jobs/{job_id}")
