"""``python -m bench.headline``: issue 13's table, the original service's stand-in beside the service in
float32 and in bfloat16, measured in interleaved rounds on one machine.

The bench cannot run the original single-process service; its stand-in is the bare in-process loop of
``bench.bare`` (Pillow decode, ``AutoImageProcessor``, a PyTorch float32 forward, pooling) at its best
batch size: each round measures it at every one of ``--loop-batch-sizes`` and keeps the best. Its
one-client figure is the same loop fed one image at a time: the median time per image of decode +
processor + forward + pooling.

Two stacks (Redis, one worker, the API) start once and stay up: the default backend and default
settings, ``IMBEDDINGS_DTYPE`` float32 in one and bfloat16 in the other. Each round then measures the
stand-in, the float32 stack and the bfloat16 stack, in an order that rotates from round to round, so
that the machine's drift falls on all three alike: one client sending ``--latency-requests`` one-image
requests one at a time, then ``--requests`` from ``--clients`` concurrent clients (``bench.service``).
While the stand-in runs, the idle stacks' CPU is counted, to show what leaving them up costs it; during
every measurement, the CPU other processes took (the machine's other tenants) and the time stolen.

Prints a JSON line per measurement, then the table: medians over the rounds with each round's figure in
brackets, and the ratio of each column's throughput to the stand-in's, round by round and its median.
``--json FILE`` keeps everything.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from bench.__main__ import jpegs_1024, machine
from bench.bare import in_process_latencies_s, in_process_loop
from bench.cli import env_assignment, int_list
from bench.load import run_load
from bench.service import Stack, measure_service, one_image_bodies, start_stack
from devtools.processes import cpu_seconds, machine_cpu_seconds, tree_cpu_seconds
from devtools.random_models import build
from shared.settings import REPO_ROOT
from worker.model.loader import LoadedModel, load_model

STANDIN = "stand-in"
DTYPES = ("float32", "bfloat16")
COLUMNS = (STANDIN, *DTYPES)
# What each round keeps of bench.service's measurement.
SERVICE_KEYS = (
    "e2e_img_s",
    "e2e_p50_ms",
    "low_load_p50_ms",
    "low_load_p99_ms",
    "low_load_worker_forward_ms",
    "mean_batch_size",
    "mean_forward_ms",
    "worker_cpu_ms_per_img",
    "worker_decoders_cpu_ms_per_img",
    "api_cpu_ms_per_img",
    "redis_cpu_ms_per_img",
    "client_cpu_ms_per_img",
    "api_rss_mb_end",
    "worker_rss_mb_end",
)


def stack_pids(stack: Stack) -> list[int]:
    return [stack.redis.process.pid, stack.worker.pid, stack.api.pid]


def stacks_cpu_seconds(stacks: dict[str, Stack]) -> float:
    """CPU of every process of the stacks, the workers' decode processes included."""
    return sum(tree_cpu_seconds(pid) for stack in stacks.values() for pid in stack_pids(stack))


def with_others_share(measure: Callable[[], dict[str, object]], stacks: dict[str, Stack]) -> dict[str, object]:
    """``measure()``'s figures, plus the CPU that processes other than the bench and its stacks took meanwhile and the
    time the hypervisor stole, in percent of one core: a round the machine's other tenants disturbed shows here."""
    busy_before, steal_before = machine_cpu_seconds()
    own_before, wall_before = cpu_seconds(os.getpid()) + stacks_cpu_seconds(stacks), time.perf_counter()
    row = measure()
    busy, steal = (now - then for now, then in zip(machine_cpu_seconds(), (busy_before, steal_before)))
    own, wall = cpu_seconds(os.getpid()) + stacks_cpu_seconds(stacks) - own_before, time.perf_counter() - wall_before
    return {**row, "others_cpu_pct": round((busy - own) / wall * 100, 1), "steal_pct": round(steal / wall * 100, 1)}


def measure_standin(model: LoadedModel, model_dir: Path, jpegs: list[bytes], args: argparse.Namespace, stacks: dict[str, Stack]) -> dict[str, object]:
    idle_before, wall_before = stacks_cpu_seconds(stacks), time.perf_counter()
    rates: dict[int, float] = {}
    cpu_ms: dict[int, float] = {}
    for batch in args.loop_batch_sizes:
        cpu_before = cpu_seconds(os.getpid())
        rates[batch] = in_process_loop(model, model_dir, jpegs, batch, args.seconds)
        # Over the measurement and its one warm-up step: what one image costs the machine.
        cpu_ms[batch] = (cpu_seconds(os.getpid()) - cpu_before) / (rates[batch] * args.seconds + batch) * 1000
    best = max(rates, key=rates.get)
    latencies = in_process_latencies_s(model, model_dir, jpegs, args.latency_requests)
    wall = time.perf_counter() - wall_before
    return {
        "e2e_img_s": round(rates[best], 2),
        "low_load_p50_ms": round(statistics.median(latencies) * 1000, 1),
        "batch": best,
        "img_s_by_batch": {str(batch): round(rate, 2) for batch, rate in rates.items()},
        "loop_cpu_ms_per_img": round(cpu_ms[best], 1),
        # Percent of one core the idle stacks took while the stand-in ran.
        "idle_stacks_cpu_pct": round((stacks_cpu_seconds(stacks) - idle_before) / wall * 100, 2),
    }


def measure_stack(stack: Stack, jpegs: list[bytes], args: argparse.Namespace) -> dict[str, float]:
    measured = measure_service(stack, jpegs, args.clients, args.requests, args.latency_requests)
    row = {key: round(measured[key], 2) for key in SERVICE_KEYS}
    # The worker's forward passes under load, timed on their own: e2e can reach at most this while the rest shares the CPUs.
    row["forward_img_s_under_load"] = round(measured["mean_batch_size"] / measured["mean_forward_ms"] * 1000, 2)
    row["cpu_ms_per_img_all_processes"] = round(sum(measured[f"{name}_cpu_ms_per_img"] for name in ("worker", "worker_decoders", "api", "redis", "client")), 1)
    return row


def summarize(rounds: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, object]]:
    """Per column: each round's img/s, p50 and throughput ratio to the stand-in, and their medians."""
    summary: dict[str, dict[str, object]] = {}
    for column in COLUMNS:
        img_s = [measured[column]["e2e_img_s"] for measured in rounds]
        p50 = [measured[column]["low_load_p50_ms"] for measured in rounds]
        ratio = [round(measured[column]["e2e_img_s"] / measured[STANDIN]["e2e_img_s"], 3) for measured in rounds]
        summary[column] = {
            "img_s": img_s,
            "img_s_median": round(statistics.median(img_s), 2),
            "p50_ms": p50,
            "p50_ms_median": round(statistics.median(p50), 1),
            "ratio_to_standin": ratio,
            "ratio_to_standin_median": round(statistics.median(ratio), 3),
        }
    return summary


def _cell(median: float, values: list[float], digits: int) -> str:
    return f"{median:.{digits}f} ({', '.join(f'{value:.{digits}f}' for value in values)})"


def table(summary: dict[str, dict[str, object]], clients: int, batch_sizes: list[int]) -> str:
    """Issue 13's table: medians over the rounds, each round's figure in brackets."""
    header = f"| load | stand-in: torch fp32 loop, best of batch {'/'.join(map(str, batch_sizes))} | Imbeddings fp32 | Imbeddings bf16 |"
    rows = [
        (f"{clients} clients × 1 image, img/s", "img_s_median", "img_s", 1),
        ("1 client, p50 ms", "p50_ms_median", "p50_ms", 0),
        ("img/s ÷ stand-in, median of the rounds' ratios", "ratio_to_standin_median", "ratio_to_standin", 2),
    ]
    lines = [header, "|---|---|---|---|"]
    for title, median, values, digits in rows:
        lines.append(f"| {title} | " + " | ".join(_cell(summary[column][median], summary[column][values], digits) for column in COLUMNS) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dinov2-small", help="a preset from devtools.random_models")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=400, help="one-image requests per stack and round, from --clients clients")
    parser.add_argument("--latency-requests", type=int, default=60, help="one-client requests per stack and round (and stand-in images at batch 1)")
    parser.add_argument("--seconds", type=float, default=8.0, help="time per measurement of the stand-in's throughput")
    parser.add_argument("--loop-batch-sizes", default="1,8,16", type=int_list, help="the stand-in's batch sizes, each measured every round; the best counts")
    parser.add_argument("--env", action="append", default=[], type=env_assignment, help="extra VAR=value for both stacks (repeatable)")
    parser.add_argument("--model-cache", type=Path, default=REPO_ROOT / ".local" / "bench-models")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    model_dir = build(args.model, args.model_cache / args.model)
    jpegs = jpegs_1024()
    standin = load_model(str(model_dir), torch.device("cpu"), torch.float32, None, warmup_batch=8)

    rounds: list[dict[str, dict[str, float]]] = []
    load_avgs: list[float] = []
    with tempfile.TemporaryDirectory(prefix="imbeddings-headline-") as tmp:
        stacks: dict[str, Stack] = {}
        try:
            for dtype in DTYPES:
                stacks[dtype] = start_stack(Path(tmp) / dtype, model_dir, dtype, dict(args.env))
                asyncio.run(run_load("127.0.0.1", stacks[dtype].port, one_image_bodies(jpegs, stacks[dtype].port), args.clients, 4 * args.clients))
            for number in range(args.rounds):
                load_avgs.append(os.getloadavg()[0])
                order = COLUMNS[number % len(COLUMNS) :] + COLUMNS[: number % len(COLUMNS)]
                measured: dict[str, dict[str, float]] = {}
                for column in order:
                    if column == STANDIN:
                        measured[column] = with_others_share(partial(measure_standin, standin, model_dir, jpegs, args, stacks), stacks)
                    else:
                        measured[column] = with_others_share(partial(measure_stack, stacks[column], jpegs, args), stacks)
                    print(json.dumps({"round": number + 1, "column": column, **measured[column]}), flush=True)
                rounds.append(measured)
        finally:
            for stack in stacks.values():
                stack.stop()

    summary = summarize(rounds)
    result = {
        "machine": machine(),
        "model": args.model,
        "clients": args.clients,
        "requests": args.requests,
        "env": dict(args.env),
        "load_avg_1m_at_round_start": load_avgs,
        "rounds": rounds,
        "summary": summary,
    }
    print()
    print(json.dumps(result["machine"]))
    print(json.dumps({"summary": summary, "load_avg_1m_at_round_start": load_avgs}))
    print(table(summary, args.clients, args.loop_batch_sizes))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
