"""Concurrent small requests share admission rounds and tasks (``api.request_groups``), over real
HTTP, Redis and a worker: each client still gets the vectors of its own images, the same as when it
is alone, and the worker's tasks carried several requests each."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from tests.support.images import bench_thumbnails, data_uri
from tests.support.stack import Stack

CLIENTS = 32


def _vectors(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([item["embedding"] for item in response.json()["data"]], dtype=np.float32)


def _requests_per_task(service: Stack) -> tuple[float, float]:
    """The worker's ``imbeddings_worker_requests_per_task``: (tasks, requests) so far, all models."""
    text = httpx.get(f"http://127.0.0.1:{service.worker.env['IMBEDDINGS_WORKER_METRICS_PORT']}/metrics", timeout=5).text
    totals = {"count": 0.0, "sum": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for suffix in totals:
                if sample.name == f"imbeddings_worker_requests_per_task_{suffix}":
                    totals[suffix] += sample.value
    return totals["count"], totals["sum"]


def test_concurrent_clients_each_get_their_own_vectors(service: Stack) -> None:
    photos = bench_thumbnails()
    with service.client() as client:
        alone = [_vectors(client.post("/v1/embeddings", json={"input": data_uri(photo)})) for photo in photos]
        two = _vectors(client.post("/v1/embeddings", json={"input": [data_uri(photos[1]), data_uri(photos[2])]}))
    np.testing.assert_allclose(two, np.concatenate([alone[1], alone[2]]), atol=1e-5)
    tasks_before, requests_before = _requests_per_task(service)

    start = threading.Barrier(CLIENTS)

    def one_client(n: int) -> tuple[list[int], np.ndarray]:
        # Clients of one image and of two, so that requests of different sizes share rounds.
        chosen = [n % len(photos)] if n % 3 else [n % len(photos), (n + 1) % len(photos)]
        with service.client() as client:
            start.wait()
            return chosen, _vectors(client.post("/v1/embeddings", json={"input": [data_uri(photos[i]) for i in chosen]}))

    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        answers = list(pool.map(one_client, range(CLIENTS)))
    for chosen, vectors in answers:
        np.testing.assert_allclose(vectors, np.concatenate([alone[i] for i in chosen]), atol=1e-5)

    tasks, requests = (after - before for after, before in zip(_requests_per_task(service), (tasks_before, requests_before)))
    print(f"{CLIENTS} concurrent clients: {requests:.0f} requests reached the worker in {tasks:.0f} tasks")
    assert requests == CLIENTS
    # Released together, they cannot all have arrived one round apart.
    assert tasks < CLIENTS
