"""``python -m bench.api_soak``: the API's memory over a long mixed load.

Redis, one worker serving the tiny ``dinov2-tiny`` model and the API run as real processes (as in
``bench.overhead``). For ``--minutes``, at once:

- ``--clients`` keep-alive clients send one-image ``/v1/embeddings`` requests (64-px JPEGs, every
  encoding in turn, one request in 20 malformed, so errors are answered too);
- one client submits jobs of ``--job-images`` data URIs and a few malformed items, waits for each,
  reads its results (a page and the JSONL stream) and deletes it;
- every ``--big-job-every-s`` seconds a job of ``--big-job-images`` 256-px data URIs (tens of MB of
  body) is submitted and cancelled at once.

The API's RSS is sampled every few seconds; printed: at start-up (idle), after a one-minute warm-up,
at the end, and the samples, with the requests answered by status.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from bench.cli import env_assignment
from bench.photos import bench_jpegs
from bench.service import start_stack
from devtools.processes import rss_mb
from devtools.random_models import build
from shared.settings import REPO_ROOT

ENCODINGS = ("float", "base64", "int8", "binary")
SAMPLE_S = 5.0
WARM_UP_S = 60.0


def _uri(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


async def _sync_client(client: httpx.AsyncClient, uris: list[str], number: int, stop: float, statuses: Counter[str]) -> None:
    sent = 0
    while time.monotonic() < stop:
        sent += 1
        body: dict[str, object] = {"input": uris[(number + sent) % len(uris)], "encoding_format": ENCODINGS[sent % len(ENCODINGS)]}
        if sent % 20 == 0:
            body["input"] = "data:image/jpeg;base64,not-base64!"
        answer = await client.post("/v1/embeddings", json=body)
        statuses[f"embeddings {answer.status_code}"] += 1


async def _job_client(client: httpx.AsyncClient, uris: list[str], images: int, stop: float, statuses: Counter[str]) -> None:
    while time.monotonic() < stop:
        inputs: list[object] = [uris[i % len(uris)] for i in range(images)]
        inputs[1] = "ftp://nowhere/x.jpg"
        answer = await client.post("/v1/jobs", json={"input": inputs, "encoding_format": "base64"})
        statuses[f"jobs {answer.status_code}"] += 1
        if answer.status_code != 202:
            await asyncio.sleep(1)
            continue
        job_id = answer.json()["id"]
        while (await client.get(f"/v1/jobs/{job_id}")).json()["status"] not in ("completed", "cancelled") and time.monotonic() < stop:
            await asyncio.sleep(0.5)
        statuses[f"job pages {(await client.get(f'/v1/jobs/{job_id}/results', params={'limit': 100})).status_code}"] += 1
        statuses[f"job jsonl {(await client.get(f'/v1/jobs/{job_id}/results.jsonl')).status_code}"] += 1
        statuses[f"job delete {(await client.delete(f'/v1/jobs/{job_id}')).status_code}"] += 1


async def _big_jobs(client: httpx.AsyncClient, uris: list[str], images: int, every_s: float, stop: float, statuses: Counter[str]) -> None:
    body = json.dumps({"input": [uris[i % len(uris)] for i in range(images)]}).encode()
    while time.monotonic() + every_s < stop:
        await asyncio.sleep(every_s)
        answer = await client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
        statuses[f"big jobs {answer.status_code}"] += 1
        if answer.status_code == 202:
            await client.delete(f"/v1/jobs/{answer.json()['id']}")


async def _sample(pid: int, stop: float, samples: list[tuple[float, float]]) -> None:
    started = time.monotonic()
    while time.monotonic() < stop:
        samples.append((round(time.monotonic() - started), round(rss_mb(pid), 1)))
        await asyncio.sleep(SAMPLE_S)


async def _soak(port: int, pid: int, args: argparse.Namespace, small: list[str], big: list[str]) -> tuple[list[tuple[float, float]], Counter[str]]:
    statuses: Counter[str] = Counter()
    samples: list[tuple[float, float]] = []
    stop = time.monotonic() + args.minutes * 60
    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120, limits=limits) as client:
        await asyncio.gather(
            _sample(pid, stop, samples),
            *(_sync_client(client, small, number, stop, statuses) for number in range(args.clients)),
            _job_client(client, small, args.job_images, stop, statuses),
            _big_jobs(client, big, args.big_job_images, args.big_job_every_s, stop, statuses),
        )
    return samples, statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--job-images", type=int, default=200)
    parser.add_argument("--big-job-images", type=int, default=2500)
    parser.add_argument("--big-job-every-s", type=float, default=30.0)
    parser.add_argument("--env", action="append", default=[], type=env_assignment, help="extra VAR=value for the worker and API (repeatable)")
    parser.add_argument("--model-cache", type=Path, default=REPO_ROOT / ".local" / "bench-models")
    args = parser.parse_args()

    small = [_uri(data) for data in bench_jpegs(64).values()]
    big = [_uri(data) for data in bench_jpegs(256).values()]
    model_dir = build("dinov2-tiny", args.model_cache / "dinov2-tiny")
    with tempfile.TemporaryDirectory(prefix="imbeddings-soak-") as tmp:
        stack = start_stack(Path(tmp), model_dir, "float32", {"IMBEDDINGS_BACKEND": "torch", **dict(args.env)})
        try:
            idle = rss_mb(stack.api.pid)
            samples, statuses = asyncio.run(_soak(stack.port, stack.api.pid, args, small, big))
            end = rss_mb(stack.api.pid)
        finally:
            stack.stop()
    warm = next((rss for seconds, rss in samples if seconds >= WARM_UP_S), samples[-1][1])
    row = {
        "minutes": args.minutes,
        "api_rss_mb_idle": round(idle, 1),
        "api_rss_mb_after_warm_up": warm,
        "api_rss_mb_end": round(end, 1),
        "api_rss_mb_max": max(rss for _, rss in samples),
        "answers": dict(sorted(statuses.items())),
        "load_avg_1m_end": os.getloadavg()[0],
        "rss_samples": samples,
    }
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
