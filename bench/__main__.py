"""``python -m bench``: throughput and latency of the bare model, a bare in-process loop and the
service end to end (HTTP -> Redis -> worker), measured in one run on this machine.

Models have the real shapes (DINOv2-S/14, ViT-B/16) with random weights: the cost is the real one.
Images are the photos in devtools/photos/bench re-encoded as 1024-px JPEGs (longest side).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from bench.bare import in_process_loop, model_only
from bench.cli import env_assignment, int_list
from bench.deep_queue import deep_queue_scenarios, deep_queue_table
from bench.fidelity import fidelity
from bench.photos import bench_jpegs
from bench.service import measure_service, start_stack
from devtools.random_models import build
from shared.settings import REPO_ROOT
from worker.model.embedder import Backend, resolve_backend
from worker.model.loader import load_model


def jpegs_1024() -> list[bytes]:
    return list(bench_jpegs(1024, upscale=True).values())


def machine() -> dict[str, object]:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor()
    )
    flags = Path("/proc/cpuinfo").read_text()
    return {
        "cpu": cpu,
        "cores": torch.get_num_threads(),
        "amx": "amx_bf16" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def run(preset: str, dtype: str, backend: Backend, args: argparse.Namespace, jpegs: list[bytes], workdir: Path) -> dict[str, object]:
    model_dir = build(preset, args.model_cache / preset)
    # The model-only figures use the same OpenVINO streams as the service's worker (--env).
    streams = dict(args.env).get("IMBEDDINGS_OPENVINO_STREAMS")
    options = {"openvino_streams": int(streams)} if streams else {}
    loaded = load_model(str(model_dir), torch.device("cpu"), getattr(torch, dtype), None, warmup_batch=8, backend=backend, **options)
    rates = model_only(loaded, args.batch_sizes, args.seconds)
    best_batch = max(rates, key=rates.get)
    del loaded
    gc.collect()
    # The loop is what a user would write without the service: PyTorch, at the same dtype.
    bare = load_model(str(model_dir), torch.device("cpu"), getattr(torch, dtype), None, warmup_batch=8)
    loop = in_process_loop(bare, model_dir, jpegs, best_batch, args.seconds)
    del bare
    gc.collect()
    stack = start_stack(workdir / f"{preset}-{dtype}-{backend}", model_dir, dtype, {"IMBEDDINGS_BACKEND": backend, **dict(args.env)})
    try:
        service = measure_service(stack, jpegs, args.clients, args.requests, args.latency_requests)
        if args.deep_queue == f"{preset}:{dtype}:{backend}":
            service["deep_queue"] = deep_queue_scenarios(f"http://127.0.0.1:{stack.port}", jpegs)
    finally:
        stack.stop()
    row: dict[str, object] = {
        "model": preset,
        "dtype": dtype,
        "backend": backend,
        "model_only_img_s": {str(k): round(v, 2) for k, v in rates.items()},
        "model_only_batch1_img_s": round(rates[1], 2),
        "model_only_best_img_s": round(rates[best_batch], 2),
        "best_batch": best_batch,
        "batch1_forward_ms": round(1000 / rates[1], 1),
        "in_process_loop_img_s": round(loop, 2),
        **{k: round(v, 2) if isinstance(v, float) else v for k, v in service.items()},
    }
    row["e2e_vs_loop"] = round(service["e2e_img_s"] / loop, 3)
    row["e2e_vs_model_only"] = round(service["e2e_img_s"] / rates[best_batch], 3)
    row["p50_minus_batch1_forward_ms"] = round(service["low_load_p50_ms"] - 1000 / rates[1], 1)
    row["p50_minus_worker_forward_ms"] = round(service["low_load_p50_ms"] - service["low_load_worker_forward_ms"], 1)
    row["worker_rss_growth_mb"] = round(service["worker_rss_mb_end"] - service["worker_rss_mb_start"], 1)
    return row


def table(rows: list[dict[str, object]]) -> str:
    columns = [
        ("model", "model"),
        ("dtype", "dtype"),
        ("backend", "backend"),
        ("model_only_batch1_img_s", "model b1"),
        ("model_only_best_img_s", "model best"),
        ("best_batch", "bs"),
        ("in_process_loop_img_s", "loop"),
        ("e2e_img_s", "e2e"),
        ("e2e_vs_loop", "e2e/loop"),
        ("e2e_vs_model_only", "e2e/model"),
        ("batch1_forward_ms", "fwd b1 ms"),
        ("low_load_p50_ms", "p50 ms"),
        ("low_load_p99_ms", "p99 ms"),
        ("p50_minus_worker_forward_ms", "p50-fwd ms"),
        ("api_rss_mb_end", "API MB"),
        ("worker_rss_mb_start", "wrk MB start"),
        ("worker_rss_mb_end", "wrk MB end"),
    ]
    lines = [" | ".join(title for _, title in columns), " | ".join("---" for _ in columns)]
    for row in rows:
        lines.append(" | ".join(str(row[key]) for key, _ in columns))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="dinov2-small,vit-base-16", help="presets from devtools.random_models")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2000, help="measured end-to-end requests per model and dtype")
    parser.add_argument("--latency-requests", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=8.0, help="time per bare measurement")
    parser.add_argument("--batch-sizes", default="1,4,8,16,32", type=int_list)
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        type=env_assignment,
        help="extra VAR=value in the environment of the worker and API (repeatable)",
    )
    parser.add_argument("--model-cache", type=Path, default=REPO_ROOT / ".local" / "bench-models")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--backends", default="torch,openvino", help="forward-pass backends to measure (openvino only where installed)")
    parser.add_argument(
        "--deep-queue", default="dinov2-small:float32:torch", help="MODEL:DTYPE:BACKEND whose stack also runs the deep-queue scenarios ('none': skip them)"
    )
    parser.add_argument("--skip-fidelity", action="store_true", help="do not measure the cosine cost of bfloat16/float16/JPEG draft")
    args = parser.parse_args()

    jpegs = jpegs_1024()
    fidelities = {}
    if not args.skip_fidelity:
        for preset in args.models.split(","):
            fidelities[preset] = fidelity(build(preset, args.model_cache / preset), jpegs)
            print(json.dumps({"fidelity": preset, **fidelities[preset]}), flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="imbeddings-bench-") as tmp:
        backends = [b for b in args.backends.split(",") if b == "torch" or resolve_backend("auto", torch.device("cpu")) == b]
        for preset in args.models.split(","):
            for dtype in args.dtypes.split(","):
                for backend in backends:
                    started = time.perf_counter()
                    rows.append(run(preset, dtype, backend, args, jpegs, Path(tmp)))
                    print(json.dumps(rows[-1]), f"({time.perf_counter() - started:.0f} s)", flush=True)
    result = {"machine": machine(), "clients": args.clients, "env": dict(args.env), "results": rows, "min_cosine_vs_float32": fidelities}
    print()
    print(json.dumps(result["machine"]))
    print(table(rows))
    for row in rows:
        if "deep_queue" in row:
            print(f"\ndeep queue ({row['model']} {row['dtype']} {row['backend']}, default limits: 60 s request timeout)")
            print(deep_queue_table(row["deep_queue"]))
    for preset, costs in fidelities.items():
        print(
            f"min cosine vs float32 ({preset}, {len(jpegs)} photos): " + ", ".join(f"{option} cls {c['cls']} mean {c['mean']}" for option, c in costs.items())
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
