"""Running it like production: several models, metrics, request ids in logs, graceful shutdown."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devtools.photos import EXAMPLES
from devtools.processes import ServiceProcess, wait_until
from devtools.redis_server import RedisServer
from tests.support.images import data_uri
from tests.support.jobs import SMALL_CHUNKS, submit, wait_done
from tests.support.processes import log_lines
from tests.support.stack import SERVED, Stack, private_stack, start_api, wait_served, wait_worker_ready

JPEG = (EXAMPLES / "cmp1.jpg").read_bytes()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def _value(samples: dict, name: str, **labels: str) -> float:
    return sum(
        value for (sample, sample_labels), value in samples.items() if sample == name and all(dict(sample_labels).get(k) == v for k, v in labels.items())
    )


def _logged(process: ServiceProcess, **fields: str) -> bool:
    return any(all(line.get(k) == v for k, v in fields.items()) for line in log_lines(process))


def _wait_logged(process: ServiceProcess, **fields: str) -> None:
    # A worker logs a request's work after it has stored the result, so the client can have its
    # answer a moment before the line is written.
    wait_until(lambda: _logged(process, **fields), 10, what=f"a log line with {fields}")


def test_several_models_are_routed_and_a_dead_workers_model_turns_503(
    tmp_path: Path, own_redis: RedisServer, allow_list: Path, tiny_models: dict[str, Path]
) -> None:
    vit, dinov2, dinov3 = (str(tiny_models[name]) for name in ("vit-tiny", "dinov2-tiny", "dinov3-tiny"))
    with private_stack(tmp_path, own_redis.url, allow_list, tiny_models, workers=0) as stack:
        first = stack.add_worker(IMBEDDINGS_WORKER_MODELS=f"{vit},{dinov2}")
        second = stack.add_worker(IMBEDDINGS_WORKER_MODELS=dinov3)
        for model, worker in ((vit, first), (dinov2, first), (dinov3, second)):
            wait_served(stack.base_url, model, worker)
        with stack.client(timeout=30) as client:
            cards = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
            assert [cards[m]["workers"] for m in (vit, dinov2, dinov3)] == [1, 1, 1]
            assert cards[dinov3]["num_register_tokens"] == 4 and cards[vit]["patch_size"] == 16 and cards[dinov2]["patch_size"] == 14
            for model, request_id in ((vit, "route-vit"), (dinov2, "route-dinov2"), (dinov3, "route-dinov3")):
                answer = client.post("/v1/embeddings", json={"model": model, "input": data_uri(JPEG)}, headers={"X-Request-ID": request_id})
                assert answer.status_code == 200 and answer.json()["model"] == model
            for request_id, worker, other in (("route-vit", first, second), ("route-dinov2", first, second), ("route-dinov3", second, first)):
                _wait_logged(worker, message="request embedded", request_id=request_id)
                assert not _logged(other, request_id=request_id)

            second.stop(signal.SIGKILL)  # no goodbye: only the heartbeat's expiry tells
            killed = time.monotonic()
            dead_model = {"model": dinov3, "input": data_uri(JPEG)}
            wait_until(lambda: client.post("/v1/embeddings", json=dead_model).status_code == 503, 60, what="503 for the dead worker's model")
            print(f"model answered 503 {time.monotonic() - killed:.1f} s after its only worker was killed (heartbeat TTL 4 s)")
            refused = client.post("/v1/embeddings", json=dead_model)
            assert refused.json()["error"]["code"] == "model_not_served" and refused.headers["retry-after"]
            assert client.post("/v1/embeddings", json={"model": vit, "input": data_uri(JPEG)}).status_code == 200
            assert {card["id"]: card["served"] for card in client.get("/v1/models").json()["data"]}[dinov3] is False


def test_metrics_after_traffic(service: Stack) -> None:
    model = service.model("dinov2-tiny")
    with service.client() as client:
        for _ in range(3):
            assert client.post("/v1/embeddings", json={"input": [data_uri(JPEG)] * 2}).status_code == 200
        client.post("/v1/embeddings", json={"input": "!!"})
        wait_done(client, submit(client, {"input": [data_uri(JPEG)] * 3})["id"])
        api = _samples(client.get("/metrics").text)
    assert _value(api, "imbeddings_http_requests_total", route="/v1/embeddings", method="POST", model=model, status="200") >= 3
    assert _value(api, "imbeddings_http_requests_total", route="/v1/embeddings", status="400") >= 1
    assert _value(api, "imbeddings_http_request_duration_seconds_count", route="/v1/embeddings") >= 4
    assert _value(api, "imbeddings_images_embedded_total", model=model) >= 6
    assert _value(api, "imbeddings_job_images_submitted_total", model=model) >= 3
    assert (("imbeddings_queue_depth", (("model", model), ("queue", "interactive"))) in api)
    assert _value(api, "imbeddings_jobs", status="completed") >= 1
    assert _value(api, "imbeddings_model_workers", model=model) >= 1
    # Only models that are served (or have work waiting) get series: not the unserved allow-listed one.
    served = {service.model(name) for name in SERVED}
    depth = {dict(labels)["model"]: 0.0 for name, labels in api if name == "imbeddings_queue_depth"}
    for (name, labels), value in api.items():
        if name == "imbeddings_queue_depth":
            depth[dict(labels)["model"]] += value
    assert served <= set(depth) and all(model in served or waiting > 0 for model, waiting in depth.items())

    port = service.worker.env["IMBEDDINGS_WORKER_METRICS_PORT"]
    worker = _samples(httpx.get(f"http://127.0.0.1:{port}/metrics").text)
    assert _value(worker, "imbeddings_worker_batch_size_count", model=model) >= 1
    assert _value(worker, "imbeddings_worker_forward_seconds_sum", model=model) > 0
    assert _value(worker, "imbeddings_worker_preprocess_seconds_count", model=model) >= 9
    assert _value(worker, "imbeddings_worker_images_total", model=model, outcome="embedded") >= 9
    assert _value(worker, "imbeddings_worker_model_load_seconds", model=model) > 0
    assert _value(worker, "imbeddings_worker_images_per_second", model=model) > 0
    assert _value(worker, "imbeddings_worker_tasks_total", kind="job_chunk", outcome="done") >= 1


def test_request_id_reaches_worker_logs_and_logs_hold_no_image_data(service: Stack) -> None:
    b64 = data_uri(JPEG).split(",", 1)[1]
    with service.client() as client:
        answer = client.post("/v1/embeddings", json={"input": data_uri(JPEG)}, headers={"X-Request-ID": "trace-e2e-123"})
        assert answer.headers["x-request-id"] == "trace-e2e-123"
        job = client.post("/v1/jobs", json={"input": [data_uri(JPEG)] * 2}, headers={"X-Request-ID": "trace-job-456"})
        assert job.status_code == 202
        wait_done(client, job.json()["id"])
    _wait_logged(service.worker, request_id="trace-e2e-123", message="request embedded")
    _wait_logged(service.worker, request_id="trace-job-456", message="job chunk embedded")
    _wait_logged(service.api, request_id="trace-e2e-123", route="/v1/embeddings")
    for text in (service.worker.log_text(), service.api.log_text()):
        assert b64[1000:1100] not in text


def test_worker_sigterm_finishes_its_work_and_hands_back_the_rest(
    tmp_path: Path, own_redis: RedisServer, allow_list: Path, tiny_models: dict[str, Path], slow_images: str
) -> None:
    # A long visibility timeout: if the job finishes promptly, it is because the stopping worker
    # handed its chunks back, not because the broker gave up waiting for them.
    overrides = {**SMALL_CHUNKS, "IMBEDDINGS_BROKER_VISIBILITY_TIMEOUT_S": "600"}
    with private_stack(tmp_path, own_redis.url, allow_list, tiny_models, **overrides) as stack:
        first = stack.worker
        with stack.client() as client:
            total = 48
            job = submit(client, {"input": [f"{slow_images}/cmp1.jpg"] * total})
            wait_until(lambda: client.get(f"/v1/jobs/{job['id']}").json()["completed"] >= 4, 60, what="the job to be under way")
            with ThreadPoolExecutor(max_workers=1) as pool:
                in_flight = pool.submit(client.post, "/v1/embeddings", json={"input": f"{slow_images}/cmp2.jpg"})
                time.sleep(0.1)
                first.send(signal.SIGTERM)
                stopping = time.monotonic()
                assert in_flight.result().status_code == 200  # a request in progress is finished
            first.process.wait(timeout=60)
            print(f"worker stopped {time.monotonic() - stopping:.1f} s after SIGTERM, exit code {first.process.returncode}")
            assert first.process.returncode == 0
            lines = log_lines(first)
            assert any(line["message"] == "worker stopping: job chunk handed back to the queue" for line in lines)
            partial_state = client.get(f"/v1/jobs/{job['id']}").json()
            assert partial_state["status"] == "running" and partial_state["completed"] < total

            second = stack.add_worker()
            wait_worker_ready(second)
            resumed = time.monotonic()
            state = wait_done(client, job["id"], timeout_s=120)
            print(f"job completed {time.monotonic() - resumed:.1f} s after the second worker was up")
            assert (state["completed"], state["failed"]) == (total, 0)
            assert time.monotonic() - resumed < 60


def test_api_sigterm_finishes_in_flight_requests(service: Stack, slow_images: str, tmp_path: Path) -> None:
    api, base_url = start_api(service.env, tmp_path / "api.log")
    try:
        with httpx.Client(base_url=base_url, timeout=60) as client, ThreadPoolExecutor(max_workers=1) as pool:
            in_flight = pool.submit(client.post, "/v1/embeddings", json={"input": f"{slow_images}/cmp1.jpg"})
            time.sleep(0.15)
            api.send(signal.SIGTERM)
            assert in_flight.result().status_code == 200
        api.process.wait(timeout=30)
        # uvicorn re-raises the signal once it has shut down cleanly, so the exit status says SIGTERM.
        assert api.process.returncode in (0, -signal.SIGTERM)
        assert "Application shutdown complete." in api.log_text()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base_url}/health", timeout=2)
    finally:
        api.stop()
