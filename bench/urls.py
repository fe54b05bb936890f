"""``python -m bench.urls``: URL jobs with a free (tiny) model, so what is measured is the service's
own cost per URL: fetch, decode, queue and store.

A local image server on 127.0.0.2 serves the bench photos re-encoded at 256 px (longest side), once
with kept-alive HTTP/1.1 connections and once closing the connection after every image (HTTP/1.0).
For each, jobs of ``--urls`` URLs are submitted and timed from submission to ``completed``; the
worker's CPU time per URL and the connections the server accepted are printed as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.cli import env_assignment
from bench.photos import bench_jpegs
from bench.service import Stack, start_stack
from devtools.image_server import ServedImages, serve_images
from devtools.processes import cpu_seconds, rss_mb, wait_until
from devtools.random_models import build
from shared.settings import REPO_ROOT

IMAGE_HOST = "127.0.0.2"


def small_jpegs(out_dir: Path, side: int) -> list[str]:
    """The bench photos at ``side`` px, written where the image server serves them; their names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    photos = bench_jpegs(side)
    for name, data in photos.items():
        (out_dir / name).write_bytes(data)
    return list(photos)


def _call(stack: Stack, method: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{stack.port}{path}", data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def run_job(stack: Stack, urls: list[str]) -> tuple[float, dict]:
    """Seconds from submission to completion, and the final job record."""
    started = time.perf_counter()
    job = _call(stack, "POST", "/v1/jobs", {"input": urls, "encoding_format": "base64"})
    state: dict = {}

    def done() -> bool:
        nonlocal state
        state = _call(stack, "GET", f"/v1/jobs/{job['id']}")
        return state["status"] in ("completed", "cancelled")

    wait_until(done, 600, interval_s=0.05, what="the URL job to complete")
    return time.perf_counter() - started, state


def measure(stack: Stack, served: ServedImages, names: list[str], count: int) -> dict[str, object]:
    urls = [served.url(f"{names[i % len(names)]}?n={i}") for i in range(count)]
    run_job(stack, urls[: max(64, count // 10)])  # warm-up: connections, allocator, code paths
    connections, requests = served.connections, served.requests
    pids = {"worker": stack.worker.pid, "api": stack.api.pid, "redis": stack.redis.process.pid}
    cpu_start = {name: cpu_seconds(pid) for name, pid in pids.items()}
    wall_s, state = run_job(stack, urls)
    cpu_ms = {f"{name}_cpu_ms_per_url": round((cpu_seconds(pid) - cpu_start[name]) / count * 1000, 2) for name, pid in pids.items()}
    if state["failed"] or state["completed"] != count:
        raise RuntimeError(f"the URL job did not embed every image: {state}")
    return {
        "urls": count,
        "img_s": round(count / wall_s, 1),
        "wall_s": round(wall_s, 2),
        **cpu_ms,
        "server_connections": served.connections - connections,
        "server_requests": served.requests - requests,
        "worker_rss_mb": round(rss_mb(stack.worker.pid), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--urls", type=int, default=2000, help="URLs per measured job")
    parser.add_argument("--side", type=int, default=256, help="longest side of the served JPEGs")
    parser.add_argument("--model", default="dinov2-tiny", help="a preset from devtools.random_models (a tiny one: the model is not what is measured)")
    parser.add_argument("--env", action="append", default=[], type=env_assignment, help="extra VAR=value for the worker and API (repeatable)")
    parser.add_argument("--model-cache", type=Path, default=REPO_ROOT / ".local" / "bench-models")
    args = parser.parse_args()

    model_dir = build(args.model, args.model_cache / args.model)
    with tempfile.TemporaryDirectory(prefix="imbeddings-bench-urls-") as tmp:
        workdir = Path(tmp)
        names = small_jpegs(workdir / "images", args.side)
        # One torch thread: the tiny model gains nothing from more, and idle OpenMP helpers spinning
        # between its sub-millisecond forwards would be counted as the worker's cost per URL.
        env = {"IMBEDDINGS_URL_ALLOWED_NETWORKS": f"{IMAGE_HOST}/32", "IMBEDDINGS_TORCH_THREADS": "1", **dict(args.env)}
        stack = start_stack(workdir / "stack", model_dir, "float32", env)
        try:
            for keep_alive in (True, False):
                with serve_images(workdir / "images", IMAGE_HOST, keep_alive=keep_alive) as served:
                    row = {
                        "server": "keep-alive" if keep_alive else "close per image",
                        "model": args.model,
                        "side": args.side,
                        **measure(stack, served, names, args.urls),
                    }
                print(json.dumps(row), flush=True)
        finally:
            stack.stop()


if __name__ == "__main__":
    main()
