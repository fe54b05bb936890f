"""``python -m bench.overhead``: the service's own CPU cost per one-image request, with a free model.

Starts Redis, one worker and the API as real processes (as ``bench.service`` does) serving a tiny
random-weight model, drives N one-image sync requests from M concurrent keep-alive clients, and prints
CPU milliseconds per request of the API (with its user / system split), the worker (its decode
children included) and Redis, Redis's commands and round trips per request (and the commands run on
the API's connections), and the requests per second reached. With a tiny model and a small JPEG, what is left is the service's own
overhead: HTTP, JSON, base64, Redis round trips, Celery publish and consume, batching, reply.

The worker's own share is its CPU per image less what decoding, preprocessing and the forward pass
cost on their own: the same JPEGs decoded, preprocessed and embedded in this process, at the batch
size the worker ran, with the worker's code and one torch thread. The worker runs torch on one
thread too (``IMBEDDINGS_TORCH_THREADS=1`` unless ``--env`` says otherwise): OpenMP helpers spinning
between the tiny model's sub-millisecond ops would otherwise be billed to the service.

``--mode jobs`` measures job images instead, as the bulk backfill client sends them: ``--jobs`` jobs
of ``--job-images`` data URIs each (the backfill client's default chunk), ``--parallel-jobs`` in flight
at once, each polled every ``--poll`` seconds, its results read as JSON lines and the job deleted when
it completes; the figures are then per image (``*_per_img``, ``img_s``), the per-task costs of Celery
and the worker being shared by the images of a chunk.

``--profile DIR`` also records py-spy stacks (collapsed, flamegraph.pl input) of the API and the worker during the measured run
(py-spy must be on PATH or given with ``--py-spy``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import httpx
import psutil
import redis
import torch

from bench.cli import env_assignment
from bench.load import run_load
from bench.photos import bench_jpegs
from bench.service import one_image_bodies, start_stack
from devtools.processes import cpu_seconds, rss_mb, tree_cpu_seconds
from devtools.random_models import build
from shared.settings import REPO_ROOT, Settings
from worker.images.decode import decode_image
from worker.images.limits import InputLimits
from worker.model.loader import load_model, probe_image
from worker.model.preprocess import choose_preprocessor, resize_rule

# The worker's histogram of requests per embed task: its sum and its count.
REQUESTS_PER_TASK = ("imbeddings_worker_requests_per_task_sum", "imbeddings_worker_requests_per_task_count")


def _command_calls(client: redis.Redis) -> Counter[str]:
    """Redis commands run so far, by name (scripts count as EVALSHA plus the commands inside)."""
    return Counter({name.removeprefix("cmdstat_"): int(stats["calls"]) for name, stats in client.info("commandstats").items()})


def pipeline_cpu_ms_per_img(model_dir: Path, jpegs: list[bytes], batch: int, images: int) -> float:
    """CPU milliseconds per image of decode + preprocess + forward + pooling alone, in this process."""
    torch.set_num_threads(1)
    settings = Settings()
    model = load_model(str(model_dir), torch.device("cpu"), torch.float32, None, batch)
    limits = replace(InputLimits.from_settings(settings).decode, resize=resize_rule(model.processor))
    preprocess = choose_preprocessor(model.processor, settings.preprocessing, probe_image())

    def run(count: int) -> None:
        for start in range(0, count, batch):
            model.embedder.embed([preprocess(decode_image(jpegs[(start + i) % len(jpegs)], limits)) for i in range(batch)])

    run(batch * 10)  # warm-up
    started = time.process_time()
    run(images)
    return (time.process_time() - started) / images * 1000


def _round_trips(client: redis.Redis) -> int:
    """Answers Redis has written to its clients so far: one per round trip (a pipeline's or a
    transaction's answers go out in one write)."""
    return int(client.info("stats")["total_writes_processed"])


def _commands_by_connection(client: redis.Redis, pid: int) -> dict[str, int]:
    """Commands run so far on each connection that process ``pid`` holds to Redis (the client's id ->
    its ``tot-cmds``; the commands inside a script are not counted)."""
    ports = {f"127.0.0.1:{conn.laddr.port}" for conn in psutil.Process(pid).net_connections(kind="tcp") if conn.raddr}
    return {entry["id"]: int(entry["tot-cmds"]) for entry in client.client_list() if entry["addr"] in ports}


def _growth(before: dict[str, float], after: dict[str, float], numerator: str, denominator: str) -> float:
    """How much ``numerator`` grew per unit of ``denominator``'s growth between two readings (0 when it did not grow)."""
    grown = after.get(denominator, 0.0) - before.get(denominator, 0.0)
    return (after.get(numerator, 0.0) - before.get(numerator, 0.0)) / grown if grown else 0.0


def _user_system_seconds(pid: int) -> tuple[float, float]:
    times = psutil.Process(pid).cpu_times()
    return times.user, times.system


def run_jobs(port: int, jpegs: list[bytes], jobs: int, job_images: int, parallel: int, poll_s: float) -> float:
    """Submit ``jobs`` jobs of ``job_images`` data URIs, ``parallel`` in flight, collect and delete each
    when it completes, as the backfill client does; returns the wall seconds."""
    uris = ["data:image/jpeg;base64," + base64.b64encode(data).decode() for data in jpegs]
    body = {"encoding_format": "base64", "input": [uris[i % len(uris)] for i in range(job_images)]}
    started = time.perf_counter()
    # The backfill client's default --timeout.
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120.0) as client:
        in_flight: list[str] = []
        submitted = 0
        while submitted < jobs or in_flight:
            while submitted < jobs and len(in_flight) < parallel:
                response = client.post("/v1/jobs", json=body)
                if response.status_code != 202:
                    raise RuntimeError(f"a job was answered {response.status_code}: {response.text[:300]}")
                in_flight.append(response.json()["id"])
                submitted += 1
            time.sleep(poll_s)
            for job_id in list(in_flight):
                job = client.get(f"/v1/jobs/{job_id}").raise_for_status().json()
                if job["status"] == "completed":
                    if job["failed"]:
                        raise RuntimeError(f"job {job_id}: {job['failed']} images failed")
                    lines = client.get(f"/v1/jobs/{job_id}/results.jsonl").raise_for_status().text.splitlines()
                    if sum(1 for line in lines if line) != job_images:
                        raise RuntimeError(f"job {job_id}: {len(lines)} results for {job_images} images")
                    client.delete(f"/v1/jobs/{job_id}").raise_for_status()
                    in_flight.remove(job_id)
                elif job["status"] not in ("queued", "running"):
                    raise RuntimeError(f"job {job_id} ended {job['status']}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("sync", "jobs"), default="sync", help="one-image sync requests, or job images")
    parser.add_argument("--model", default="dinov2-tiny", help="tiny preset from devtools.random_models")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--jobs", type=int, default=10, help="jobs measured (--mode jobs)")
    parser.add_argument("--job-images", type=int, default=1000, help="images per job (--mode jobs; the backfill client's --chunk-items)")
    parser.add_argument("--parallel-jobs", type=int, default=4, help="jobs in flight at once (--mode jobs; the backfill client's default)")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between a job's status polls (--mode jobs; the backfill client's default)")
    parser.add_argument("--side", type=int, default=64, help="longest side of the JPEGs sent")
    parser.add_argument("--env", action="append", default=[], type=env_assignment, help="extra VAR=value for the worker and API (repeatable)")
    parser.add_argument("--profile", type=Path, default=None, help="write py-spy stacks of the API and worker here")
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    parser.add_argument("--model-cache", type=Path, default=REPO_ROOT / ".local" / "bench-models")
    args = parser.parse_args()

    sync = args.mode == "sync"
    # One image per sync request, so the sync figures per request are per image too.
    unit, count = ("req", args.requests) if sync else ("img", args.jobs * args.job_images)
    jpegs = list(bench_jpegs(args.side).values())
    model_dir = build(args.model, args.model_cache / args.model)
    with tempfile.TemporaryDirectory(prefix="imbeddings-overhead-") as tmp:
        stack = start_stack(Path(tmp), model_dir, "float32", {"IMBEDDINGS_BACKEND": "torch", "IMBEDDINGS_TORCH_THREADS": "1", **dict(args.env)})
        try:
            bodies = one_image_bodies(jpegs, stack.port) if sync else []
            if sync:
                warm = asyncio.run(run_load("127.0.0.1", stack.port, bodies, args.clients, max(200, args.requests // 10)))
                if warm.errors:
                    raise RuntimeError(f"the service answered errors while warming up: {warm.errors}")
            else:
                run_jobs(stack.port, jpegs, 1, args.job_images, 1, args.poll)
            pids = {"api": stack.api.pid, "worker": stack.worker.pid, "redis": stack.redis.process.pid}
            recorders = []
            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
                for name in ("api", "worker"):
                    out = args.profile / f"{name}.folded"
                    recorders.append(
                        subprocess.Popen(
                            [args.py_spy, "record", "-p", str(pids[name]), "-o", str(out), "-f", "raw", "-r", "200", "--nonblocking"],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                        )
                    )
            redis_client = stack.redis.client()
            commands_before = _command_calls(redis_client)
            trips_before = _round_trips(redis_client)
            api_commands_before = _commands_by_connection(redis_client, stack.api.pid)
            api_times_before = _user_system_seconds(stack.api.pid)
            before = {name: tree_cpu_seconds(pid) for name, pid in pids.items()}
            worker_main_before = cpu_seconds(stack.worker.pid)
            batches_before = stack.batch_totals()
            worker_before = stack.worker_totals()
            if sync:
                result = asyncio.run(run_load("127.0.0.1", stack.port, bodies, args.clients, args.requests))
                wall_s = result.wall_s
            else:
                wall_s = run_jobs(stack.port, jpegs, args.jobs, args.job_images, args.parallel_jobs, args.poll)
            after = {name: tree_cpu_seconds(pid) for name, pid in pids.items()}
            decoders = after["worker"] - before["worker"] - (cpu_seconds(stack.worker.pid) - worker_main_before)
            api_times = [now - then for now, then in zip(_user_system_seconds(stack.api.pid), api_times_before)]
            batches_after = stack.batch_totals()
            worker_after = stack.worker_totals()
            commands = _command_calls(redis_client) - commands_before
            trips = _round_trips(redis_client) - trips_before
            api_commands = sum(n - api_commands_before.get(client_id, 0) for client_id, n in _commands_by_connection(redis_client, stack.api.pid).items())
            for recorder in recorders:
                recorder.send_signal(2)
                recorder.wait(timeout=60)
            if sync and result.errors:
                raise RuntimeError(f"the service answered errors: {result.errors}")
            batches = (batches_after[0] - batches_before[0]) or 1.0
            row = {
                "model": args.model,
                "jpeg_side": args.side,
                "jpeg_bytes_mean": round(sum(map(len, jpegs)) / len(jpegs)),
                **(
                    {"clients": args.clients, "requests": count, "req_s": round(count / wall_s, 1)}
                    if sync
                    else {
                        "jobs": args.jobs,
                        "job_images": args.job_images,
                        "parallel_jobs": args.parallel_jobs,
                        "images": count,
                        "img_s": round(count / wall_s, 1),
                    }
                ),
                **{f"{name}_cpu_ms_per_{unit}": round((after[name] - before[name]) / count * 1000, 3) for name in pids},
                f"worker_decoders_cpu_ms_per_{unit}": round(decoders / count * 1000, 3),
                f"api_user_system_ms_per_{unit}": [round(seconds / count * 1000, 3) for seconds in api_times],
                f"redis_commands_per_{unit}": round(sum(commands.values()) / count, 1),
                f"redis_round_trips_per_{unit}": round(trips / count, 2),
                f"api_redis_commands_per_{unit}": round(api_commands / count, 2),
                f"redis_top_commands_per_{unit}": {name: round(n / count, 2) for name, n in commands.most_common(12)},
                "forward_ms_per_img": round((batches_after[2] - batches_before[2]) / (batches_after[1] - batches_before[1]) * 1000, 3),
                "mean_batch": round((batches_after[1] - batches_before[1]) / batches, 2),
                # Sync requests a task carried (those an API process admitted together share one).
                "requests_per_task": round(_growth(worker_before, worker_after, *REQUESTS_PER_TASK), 2),
                "api_rss_mb": round(rss_mb(stack.api.pid), 1),
                "worker_rss_mb": round(rss_mb(stack.worker.pid), 1),
                "cpus": len(os.sched_getaffinity(0)),
            }
            # The ceilings: requests per second one process would reach on a core of its own.
            row[f"api_ceiling_{unit}_s"] = round(1000 / row[f"api_cpu_ms_per_{unit}"], 1)
            row["worker_ceiling_img_s"] = round(1000 / row[f"worker_cpu_ms_per_{unit}"], 1)
        finally:
            stack.stop()
    # After the stack has stopped, so the reference does not share the CPUs with it.
    row["pipeline_cpu_ms_per_img"] = round(pipeline_cpu_ms_per_img(model_dir, jpegs, max(1, round(row["mean_batch"])), count), 3)
    row["worker_own_cpu_ms_per_img"] = round(row[f"worker_cpu_ms_per_{unit}"] - row["pipeline_cpu_ms_per_img"], 3)
    row["worker_own_ceiling_img_s"] = round(1000 / max(row["worker_own_cpu_ms_per_img"], 1e-3), 1)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
