"""Hostile bytes against a real worker with the default settings (issue 11): every file is refused
with its reason, and the worker's CPU seconds and memory per file stay bounded; heavy images do not
hold up other requests; a worker decoding a heavy image stops promptly on SIGTERM."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from devtools.photos import BENCH
from devtools.processes import ServiceProcess, children, cpu_seconds, reset_peak_rss, status_kb, wait_until
from tests.support.hostile_images import heavy_jpeg, refused_by_structure
from tests.support.images import data_uri
from tests.support.stack import SET_FOR_SPEED, private_stack, running_redis

MODEL = "dinov2-tiny"  # shortest-edge resize, the rule that makes a thin image enormous
CPU_BOUND_S = 2.0
RSS_BOUND_MB = 300.0


@dataclass
class Worker:
    base_url: str
    process: ServiceProcess


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, allow_list: Path, tiny_models: dict[str, Path]) -> Iterator[Worker]:
    root = tmp_path_factory.mktemp("hostile-bytes")
    with running_redis(root / "redis") as server, private_stack(root, server.url, allow_list, tiny_models, model=MODEL, unset=SET_FOR_SPEED) as stack:
        yield Worker(stack.base_url, stack.worker)


def _tree_cpu(pid: int) -> float:
    """CPU seconds of the worker, its live decode children, and the children it has reaped."""
    return cpu_seconds(pid, reaped=True) + sum(cpu_seconds(child) for child in children(pid))


def _post(base_url: str, inputs: list[str]) -> httpx.Response:
    with httpx.Client(base_url=base_url, timeout=120) as client:
        return client.post("/v1/embeddings", json={"input": inputs})


@pytest.mark.parametrize("name", sorted(refused_by_structure()))
def test_hostile_file_refused_within_cpu_and_memory_bounds(worker: Worker, name: str) -> None:
    data, code, phrase = refused_by_structure()[name]
    pid = worker.process.pid
    processes = [pid, *children(pid)]
    for process in processes:
        reset_peak_rss(process)
    rss_before = {process: status_kb(process, "VmRSS") for process in processes}
    cpu_before = _tree_cpu(pid)
    response = _post(worker.base_url, [data_uri(data)])
    cpu = _tree_cpu(pid) - cpu_before
    growth_mb = max(status_kb(process, "VmHWM") - rss_before[process] for process in processes if Path(f"/proc/{process}").exists()) / 1024
    print(f"{name}: {len(data)} bytes -> {response.status_code}, worker+decoders {cpu:.2f} CPU s, peak RSS growth {growth_mb:.0f} MB")
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"], phrase in error["message"]) == ("input[0]", code, True), error
    assert cpu < CPU_BOUND_S and growth_mb < RSS_BOUND_MB


def test_heavy_images_do_not_hold_up_other_requests(worker: Worker) -> None:
    """Two images that pass every limit and cost seconds of decoding each, in one request, while a
    normal request comes in: the normal one is answered, and the heavy one is answered too."""
    heavy = data_uri(heavy_jpeg())
    normal = data_uri((BENCH / "horse_800x600.jpg").read_bytes())
    with ThreadPoolExecutor(max_workers=2) as pool:
        started = time.monotonic()
        heavy_request = pool.submit(_post, worker.base_url, [heavy, heavy])
        time.sleep(0.5)  # the heavy images are being decoded
        sent = time.monotonic()
        normal_response = _post(worker.base_url, [normal])
        normal_s = time.monotonic() - sent
        heavy_response = heavy_request.result()
        heavy_s = time.monotonic() - started
    print(f"normal request: {normal_response.status_code} in {normal_s:.2f} s; two heavy images: {heavy_response.status_code} in {heavy_s:.2f} s")
    assert normal_response.status_code == 200, normal_response.text
    # Within every limit they are embedded, unless this machine is slow enough to spend the CPU budget on them.
    assert heavy_response.status_code == 200 or heavy_response.json()["error"]["code"] == "decode_budget_exceeded", heavy_response.text


def test_sigterm_during_a_heavy_decode_stops_the_worker_promptly(worker: Worker) -> None:
    """Runs last in this module: it stops the module's worker."""
    pid = worker.process.pid
    before = {child: cpu_seconds(child) for child in children(pid)}
    answer: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: answer.append(_post(worker.base_url, [data_uri(heavy_jpeg())])))
    sender.start()

    def decoding() -> bool:
        return any(cpu_seconds(child) - before.get(child, 0.0) > 0.2 for child in children(pid))

    wait_until(decoding, 60, interval_s=0.02, what="a decode child to be busy")
    signalled = time.monotonic()
    worker.process.send(signal.SIGTERM)
    wait_until(lambda: not worker.process.alive(), 30, interval_s=0.05, what="the worker to exit after SIGTERM")
    exit_s = time.monotonic() - signalled
    sender.join(60)
    print(f"worker exited {exit_s:.2f} s after SIGTERM; the request in flight got {answer[0].status_code if answer else 'no answer'}")
    assert exit_s < 15
    assert not _children_alive(pid)


def _children_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and bool(children(pid))
