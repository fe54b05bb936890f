"""``python -m bench.events``: what Celery's heartbeats and task events cost.

The service end to end (Redis, one worker, the API, one-image requests from concurrent clients), run
twice in one go on the same machine and model: with ``IMBEDDINGS_CELERY_EVENTS`` on (the default) and
off. One-image requests are where events weigh most: four events per task, one image per task.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench.__main__ import jpegs_1024
from bench.service import measure_service, start_stack
from devtools.random_models import build
from shared.settings import REPO_ROOT

REPORTED = (
    "e2e_img_s",
    "e2e_p50_ms",
    "low_load_p50_ms",
    "worker_cpu_ms_per_img",
    "api_cpu_ms_per_img",
    "redis_cpu_ms_per_img",
    "mean_batch_size",
    "mean_forward_ms",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dinov2-small", help="a preset from devtools.random_models")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--latency-requests", type=int, default=100)
    parser.add_argument("--model-cache", type=Path, default=REPO_ROOT / ".local" / "bench-models")
    args = parser.parse_args()

    model_dir = build(args.model, args.model_cache / args.model)
    jpegs = jpegs_1024()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="imbeddings-bench-events-") as tmp:
        for events in ("true", "false"):
            stack = start_stack(Path(tmp) / events, model_dir, args.dtype, {"IMBEDDINGS_DEVICE": args.device, "IMBEDDINGS_CELERY_EVENTS": events})
            try:
                measured = measure_service(stack, jpegs, args.clients, args.requests, args.latency_requests)
            finally:
                stack.stop()
            rows[events] = {key: round(measured[key], 3) for key in REPORTED}
            print(json.dumps({"celery_events": events, "model": args.model, "device": args.device, "dtype": args.dtype, **rows[events]}), flush=True)
    on, off = rows["true"], rows["false"]
    print(
        f"events cost per one-image request: worker {on['worker_cpu_ms_per_img'] - off['worker_cpu_ms_per_img']:+.2f} ms CPU, "
        f"API {on['api_cpu_ms_per_img'] - off['api_cpu_ms_per_img']:+.2f} ms, Redis {on['redis_cpu_ms_per_img'] - off['redis_cpu_ms_per_img']:+.2f} ms; "
        f"throughput {on['e2e_img_s']:.1f} img/s with events, {off['e2e_img_s']:.1f} without"
    )


if __name__ == "__main__":
    main()
