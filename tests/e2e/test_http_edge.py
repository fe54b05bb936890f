"""The HTTP edge against hostile clients, on a real API process with the default edge settings:
absurd JSON bodies, headers trickled a byte at a time, and hundreds of slow uploads at once.

Each test prints what it measured (the API's CPU seconds and peak RSS, the slowest /health answer
seen meanwhile). The bounds asserted are generous: they separate "bounded" from the 30 s and
gigabytes these inputs used to cost, not fast from slow.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest

from api.json_body import JSON_VALUES_BASE, JSON_VALUES_PER_INPUT
from devtools.processes import ServiceProcess, cpu_seconds, reset_peak_rss, status_kb, wait_until
from devtools.redis_server import RedisServer
from shared.settings import Settings
from tests.support.sockets import address
from tests.support.stack import running_redis, service_env, start_api

MiB = 2**20
DEFAULTS = Settings(_env_file=None)
# The most the API may reach under each hostile input, idle size included (measured: README, "Hostile inputs").
PEAK_RSS_BOUND_MB = 400
CPU_BOUND_S = 5.0
HEALTH_BOUND_S = 5.0


@dataclass
class EdgeAPI:
    process: ServiceProcess
    base_url: str

    @property
    def address(self) -> tuple[str, int]:
        return address(self.base_url)

    def peak_rss_mb(self) -> float:
        return status_kb(self.process.pid, "VmHWM") / 1024

    def rss_mb(self) -> float:
        return status_kb(self.process.pid, "VmRSS") / 1024

    def reset_peak_rss(self) -> None:
        reset_peak_rss(self.process.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.process.pid)

    def buffered_body_bytes(self) -> float:
        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        line = next(line for line in text.splitlines() if line.startswith("imbeddings_http_buffered_body_bytes "))
        return float(line.split()[1])


@pytest.fixture(scope="module")
def edge_api(allow_list: Path, tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeAPI]:
    """An API with its own Redis and no worker (what is tested here is decided before any worker
    is involved), edge settings left at their defaults."""
    root = tmp_path_factory.mktemp("edge")
    with running_redis(root / "redis") as store:
        api, base_url = start_api(service_env(store.url, allow_list, tiny_models), root / "api.log")
        yield EdgeAPI(api, base_url)
        api.stop()


# The probe runs in a process of its own, so that what it measures is the API, not this process's GIL.
_PROBE = """
import math, signal, sys, time
import httpx
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
with httpx.Client(base_url=sys.argv[1], timeout=60) as client:
    while not stopping:
        started = time.perf_counter()
        try:
            ok = client.get("/health").status_code == 200
        except httpx.HTTPError:
            ok = False
        print(time.perf_counter() - started if ok else math.inf, flush=True)
        time.sleep(0.1)
"""


@contextmanager
def health_probe(base_url: str) -> Iterator[list[float]]:
    """Asks /health every 0.1 s from another client meanwhile; fills in the latencies seen when the
    block ends (infinite for an answer that was not a 200 or did not come within 60 s)."""
    latencies: list[float] = []
    probe = subprocess.Popen([sys.executable, "-c", _PROBE, base_url], stdout=subprocess.PIPE, text=True)
    try:
        if not probe.stdout.readline():  # type: ignore[union-attr]
            raise RuntimeError("the /health probe did not start")
        yield latencies
        # At least one answer from after the block's work, however fast that work was refused.
        latencies.append(float(probe.stdout.readline()))  # type: ignore[union-attr]
    finally:
        probe.send_signal(signal.SIGTERM)
        output, _ = probe.communicate(timeout=120)
        latencies += [float(line) for line in output.split()]


def _many(item: bytes, total_bytes: int) -> bytes:
    return b",".join([item] * (total_bytes // (len(item) + 1)))


HOSTILE_BODIES = {
    # The case: 4 MiB of 1.4 million empty objects (what it cost before: README, "Hostile inputs").
    "4MiB-empty-objects": ("/v1/embeddings", b'{"input": [' + _many(b"{}", 4 * MiB) + b"]}", "too_many_json_values"),
    "4MiB-empty-objects-job": ("/v1/jobs", b'{"input": [' + _many(b"{}", 4 * MiB) + b"]}", "too_many_json_values"),
    "16MiB-empty-objects": ("/v1/embeddings", b'{"input": [' + _many(b"{}", 16 * MiB) + b"]}", "too_many_json_values"),
    "16MiB-short-strings-elsewhere": ("/v1/embeddings", b'{"input": "x", "user": [' + _many(b'"ab"', 16 * MiB) + b"]}", "too_many_json_values"),
    # Within the value budget of a job, but more images than a job may hold: counted before pydantic sees them.
    "200k-urls-job": ("/v1/jobs", orjson.dumps({"input": ["http://a.test/i.jpg"] * 200_000}), "too_many_inputs"),
    # Within every count, each item malformed: pydantic reports the first few, not 100,000.
    "100k-bad-objects-job": ("/v1/jobs", b'{"input": [' + b",".join([b'{"type": "image"}'] * 100_000) + b"]}", "invalid_request"),
    # Deeper than the parser's recursion limit (1024) yet within the value budget: refused, nothing crashes.
    "deep-nesting": ("/v1/embeddings", b'{"input": ' + b"[" * 3000 + b"]" * 3000 + b"}", "invalid_json"),
}


@pytest.mark.parametrize("name", HOSTILE_BODIES)
def test_absurd_json_bodies_are_refused_cheaply_and_the_api_stays_responsive(edge_api: EdgeAPI, name: str) -> None:
    path, body, code = HOSTILE_BODIES[name]
    edge_api.reset_peak_rss()
    cpu_before = edge_api.cpu_seconds()
    with health_probe(edge_api.base_url) as latencies, httpx.Client(base_url=edge_api.base_url, timeout=120) as client:
        started = time.perf_counter()
        answer = client.post(path, content=body, headers={"Content-Type": "application/json"})
        elapsed = time.perf_counter() - started
    cpu = edge_api.cpu_seconds() - cpu_before
    peak = edge_api.peak_rss_mb()
    print(f"{name}: {len(body) / MiB:.1f} MiB -> {answer.status_code} {answer.json()['error']['code']} in {elapsed:.2f} s; "
          f"API CPU {cpu:.2f} s, peak RSS {peak:.0f} MB, slowest /health {max(latencies):.3f} s of {len(latencies)}")
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == code and error["message"], error
    assert cpu < CPU_BOUND_S and peak < PEAK_RSS_BOUND_MB and max(latencies) < HEALTH_BOUND_S


def test_separators_and_escapes_inside_strings_are_not_counted(edge_api: EdgeAPI) -> None:
    """256 URLs full of commas, colons, brackets, quotes and backslashes: far more separators than
    the value bound of a request, all inside strings, so the request is parsed and goes on (to the
    503 for a model no worker serves)."""
    url = 'http://a.test/c_fill,w_100,h_100,g_face,q_80,f_auto:{x}/[1,2,3,4,5,6,7,8]/"quoted"\\back\\slash,{i}.jpg'
    body = orjson.dumps({"input": [url.replace("{i}", str(i)) for i in range(DEFAULTS.max_inputs_per_request)]})
    assert body.count(b",") + body.count(b":") > JSON_VALUES_PER_INPUT * DEFAULTS.max_inputs_per_request + JSON_VALUES_BASE
    with httpx.Client(base_url=edge_api.base_url, timeout=60) as client:
        answer = client.post("/v1/embeddings", content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "model_not_served", answer.text


def test_a_large_valid_job_body_is_parsed_off_the_event_loop(edge_api: EdgeAPI) -> None:
    """100,000 image objects (the most a job may hold) are accepted by the parser and validated in
    a worker thread: /health keeps answering meanwhile. (No worker runs here, and the model is
    unknown, so the answer is the 404 that comes after validation.)"""
    body = orjson.dumps({"model": "not-listed", "input": [{"type": "image", "image_url": f"http://a.test/{i}.jpg"} for i in range(100_000)]})
    with health_probe(edge_api.base_url) as latencies, httpx.Client(base_url=edge_api.base_url, timeout=120) as client:
        started = time.perf_counter()
        answer = client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
        elapsed = time.perf_counter() - started
    print(
        f"100k image objects ({len(body) / MiB:.1f} MiB): {answer.status_code} in {elapsed:.2f} s; slowest /health {max(latencies):.3f} s of {len(latencies)}"
    )
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_not_found", answer.text
    assert max(latencies) < HEALTH_BOUND_S


def test_the_largest_valid_body_is_parsed_off_the_event_loop(edge_api: EdgeAPI) -> None:
    """Two images at the 20 MiB image limit, as data URIs (53 MiB of JSON): parsed, validated and
    base64-decoded while /health keeps answering; the answer is the 503 for a model no worker
    serves (none runs here), which comes after all of that."""
    image = b"\xff\xd8" + os.urandom(DEFAULTS.max_image_bytes - 2)
    uri = "data:image/jpeg;base64," + base64.b64encode(image).decode()
    body = orjson.dumps({"input": [uri, uri]})
    assert len(body) < DEFAULTS.max_request_bytes
    edge_api.reset_peak_rss()
    rss_before = edge_api.rss_mb()
    cpu_before = edge_api.cpu_seconds()
    with health_probe(edge_api.base_url) as latencies, httpx.Client(base_url=edge_api.base_url, timeout=120) as client:
        started = time.perf_counter()
        answer = client.post("/v1/embeddings", content=body, headers={"Content-Type": "application/json"})
        elapsed = time.perf_counter() - started
    cpu = edge_api.cpu_seconds() - cpu_before
    peak = edge_api.peak_rss_mb()
    print(f"largest valid body ({len(body) / MiB:.1f} MiB): {answer.status_code} in {elapsed:.2f} s; API CPU {cpu:.2f} s, "
          f"RSS {rss_before:.0f} -> peak {peak:.0f} MB; slowest /health {max(latencies):.3f} s of {len(latencies)}")
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "model_not_served", answer.text
    # The body, its parsed strings, the decoded images and their copy on the way to Redis are alive
    # together: a few times the body, no more.
    assert peak - rss_before < 6 * len(body) / MiB and max(latencies) < HEALTH_BOUND_S


async def _trickle_head(host: str, port: int, mode: str, results: list[tuple[str, float, bytes]]) -> None:
    """One client that never finishes a request head: ``silent`` sends nothing, ``trickle`` one
    byte a second, ``kept-alive`` a complete request first and then trickles the next head."""
    started = time.monotonic()  # before connecting: the server's clock starts later, never earlier
    reader, writer = await asyncio.open_connection(host, port)
    if mode == "kept-alive":
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = await reader.readuntil(b'{"status":"ok"}')
        assert first.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
    if mode != "silent":
        writer.write(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    answer = b""
    try:
        while time.monotonic() - started < 60:
            try:
                chunk = await asyncio.wait_for(reader.read(4096), timeout=1.0)
            except TimeoutError:
                if mode != "silent":
                    writer.write(b"a")
                continue
            if not chunk:
                break
            answer += chunk
    except ConnectionResetError:
        pass
    results.append((mode, time.monotonic() - started, answer))
    writer.close()


def test_trickled_headers_are_cut_off_at_the_header_timeout(edge_api: EdgeAPI) -> None:
    """500 sockets that never finish their headers are closed by the server once the default
    header timeout has passed; those that sent part of a request are told why (408)."""
    timeout = DEFAULTS.header_timeout_s
    host, port = edge_api.address
    results: list[tuple[str, float, bytes]] = []

    async def run() -> None:
        modes = ["trickle"] * 400 + ["silent"] * 50 + ["kept-alive"] * 50
        await asyncio.gather(*(_trickle_head(host, port, mode, results) for mode in modes))

    with health_probe(edge_api.base_url) as latencies:
        asyncio.run(run())
    assert len(results) == 500
    closed_after = sorted(seconds for _, seconds, _ in results)
    print(f"500 unfinished heads closed after {closed_after[0]:.1f}-{closed_after[-1]:.1f} s (header timeout {timeout:g} s); "
          f"slowest /health meanwhile {max(latencies):.3f} s of {len(latencies)}")
    assert timeout - 0.5 <= closed_after[0] and closed_after[-1] <= timeout + 10
    for mode, _, answer in results:
        if mode == "silent":
            assert answer == b""
        else:
            head, _, payload = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408"), answer[:200]
            assert orjson.loads(payload)["error"]["code"] == "header_timeout"
    assert max(latencies) < HEALTH_BOUND_S


def test_an_endless_header_gets_431(edge_api: EdgeAPI) -> None:
    limit = DEFAULTS.max_header_bytes
    host, port = edge_api.address

    async def run() -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Endless: " + b"a" * (limit + 4096))
        answer = await asyncio.wait_for(reader.read(), timeout=30)
        writer.close()
        return answer

    answer = asyncio.run(run())
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431") and orjson.loads(payload)["error"]["code"] == "headers_too_large"


async def _slow_upload(host: str, port: int, declared: int, sent: int, wait_s: float) -> tuple[bytes, asyncio.StreamWriter]:
    """Declares ``declared`` bytes, sends ``sent`` of them, then waits up to ``wait_s`` for an answer."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % declared)
    writer.write(b'{"input": "' + b"A" * (sent - 11))
    answer = b""
    try:
        await writer.drain()
        answer = await asyncio.wait_for(_read_answer(reader), timeout=wait_s)
    except (TimeoutError, ConnectionResetError, asyncio.IncompleteReadError):
        pass
    return answer, writer


async def _read_answer(reader: asyncio.StreamReader) -> bytes:
    """Head and body of one answer: they may arrive in separate segments."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
    return head + await reader.readexactly(length)


def test_slow_uploads_are_held_within_the_body_budget(edge_api: EdgeAPI) -> None:
    """200 uploads declaring 60 MB each, every one stalling after 4 MiB: the ones that fit the
    default budget are held; the others are refused at once with a 429 they can read; the API's
    memory stays bounded, and the budget is free again once they leave."""
    declared, sent = 60_000_000, 4 * MiB
    admitted_expected = DEFAULTS.max_buffered_bytes // declared
    host, port = edge_api.address
    edge_api.reset_peak_rss()

    async def run() -> list[bytes]:
        uploads = await asyncio.gather(*(_slow_upload(host, port, declared, sent, wait_s=3) for _ in range(200)))
        answers = [answer for answer, _ in uploads]
        # While they are still connected: what the API holds for them.
        held = await asyncio.to_thread(edge_api.buffered_body_bytes)
        assert held == admitted_expected * declared, held
        for _, writer in uploads:
            writer.close()
        return answers

    with health_probe(edge_api.base_url) as latencies:
        answers = asyncio.run(run())
    peak = edge_api.peak_rss_mb()
    refused = [answer for answer in answers if answer.startswith(b"HTTP/1.1 429")]
    waiting = [answer for answer in answers if not answer]
    print(f"200 uploads declaring {declared} bytes: {len(waiting)} held, {len(refused)} refused with 429; "
          f"API peak RSS {peak:.0f} MB; slowest /health {max(latencies):.3f} s of {len(latencies)}")
    assert len(waiting) == admitted_expected and len(refused) == 200 - admitted_expected
    head, _, payload = refused[0].partition(b"\r\n\r\n")
    assert b"retry-after: 2" in head.lower()
    error = orjson.loads(payload)["error"]
    assert error["code"] == "too_many_bytes_in_flight" and str(DEFAULTS.max_buffered_bytes) in error["message"]
    assert peak < PEAK_RSS_BOUND_MB and max(latencies) < HEALTH_BOUND_S
    wait_until(lambda: edge_api.buffered_body_bytes() == 0, 30, what="the body budget to be released")
    with httpx.Client(base_url=edge_api.base_url, timeout=30) as client:
        assert client.post("/v1/embeddings", json={"input": "not base64!"}).status_code == 400


def test_a_body_that_does_not_arrive_in_time_gets_408(redis_server: RedisServer, allow_list: Path, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """The body deadline (60 s by default; 2 s here) ends an upload that stalls, and frees its share of the budget."""
    env = service_env(redis_server.url, allow_list, tiny_models, IMBEDDINGS_BODY_TIMEOUT_S="2")
    api, base_url = start_api(env, tmp_path / "api.log")
    edge = EdgeAPI(api, base_url)
    try:

        async def stall() -> bytes:
            answer, writer = await _slow_upload(*edge.address, 10 * MiB, MiB, wait_s=30)
            writer.close()
            return answer

        started = time.monotonic()
        answer = asyncio.run(stall())
        waited = time.monotonic() - started
        head, _, payload = answer.partition(b"\r\n\r\n")
        print(f"stalled upload answered after {waited:.1f} s: {head.splitlines()[0] if head else b'nothing'}")
        assert head.startswith(b"HTTP/1.1 408"), answer[:200]
        assert orjson.loads(payload)["error"]["code"] == "body_timeout"
        assert edge.buffered_body_bytes() == 0
    finally:
        api.stop()
