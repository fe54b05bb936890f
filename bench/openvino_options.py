"""``python -m bench.openvino_options``: OpenVINO CPU plugin settings, the forward pass alone.

Each variant compiles the same converted model (the worker's own conversion and cache) with other
plugin settings and runs batches of random pixels through it: as one synchronous infer request (what
the worker did with one stream), or split over the compiled model's streams as parallel requests.
Variants run in rounds (A B C ... A B C ...), so a noisy machine hits every variant alike; the
script prints every round and the median per variant, with the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from bench.bare import rate
from bench.cli import int_list
from devtools.random_models import build
from shared.settings import REPO_ROOT
from worker.model.embedder import converted_model
from worker.model.loader import load_pretrained, probe_image
from worker.model.pooling import pool_cls_mean

PRECISIONS = {"float32": "f32", "bfloat16": "bf16"}

# name -> (plugin config beyond the precision, parallel requests per batch)
VARIANTS: dict[str, tuple[dict[str, object], int]] = {
    "1 stream x 2 threads (before)": ({"INFERENCE_NUM_THREADS": 2, "NUM_STREAMS": 1}, 1),
    "2 streams x 1 thread, batch split in 2": ({"INFERENCE_NUM_THREADS": 2, "NUM_STREAMS": 2}, 2),
    "hint THROUGHPUT, batch split over its streams": ({"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_NUM_THREADS": 2}, 0),
    "hint LATENCY": ({"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 2}, 1),
    "1 stream, no pinning": ({"INFERENCE_NUM_THREADS": 2, "NUM_STREAMS": 1, "ENABLE_CPU_PINNING": False}, 1),
    "2 streams, no pinning, batch split in 2": ({"INFERENCE_NUM_THREADS": 2, "NUM_STREAMS": 2, "ENABLE_CPU_PINNING": False}, 2),
}


def run_split(requests: list, pixels: np.ndarray) -> None:
    """The batch cut into len(requests) parts, started together and waited for."""
    parts = np.array_split(pixels, len(requests))
    for request, part in zip(requests, parts):
        if len(part):
            request.start_async([part])
    for request, part in zip(requests, parts):
        if len(part):
            request.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dinov2-small")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch-sizes", default="1,4,8,16", type=int_list)
    parser.add_argument("--variants", default=",".join(str(i) for i in range(len(VARIANTS))), help="indexes into the variant list")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--model-cache", type=Path, default=REPO_ROOT / ".local" / "bench-models")
    args = parser.parse_args()

    import openvino as ov

    model_dir = build(args.model, args.model_cache / args.model)
    config, module, processor = load_pretrained(str(model_dir), torch.device("cpu"), None)
    pixel_values = processor(images=probe_image(), return_tensors="pt")["pixel_values"]
    image_size = (int(pixel_values.shape[-2]), int(pixel_values.shape[-1]))
    with tempfile.TemporaryDirectory() as tmp:
        converted = converted_model(module, image_size, Path(tmp))
    chosen = [list(VARIANTS)[int(i)] for i in args.variants.split(",")]
    core = ov.Core()
    print(json.dumps({"loadavg_start": os.getloadavg()}), flush=True)
    results: dict[tuple[str, str, int], list[float]] = {}
    for round_ in range(args.rounds):
        for dtype in args.dtypes.split(","):
            for name in chosen:
                plugin, parallel = VARIANTS[name]
                compiled = core.compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": PRECISIONS[dtype], **plugin})
                streams = int(compiled.get_property("NUM_STREAMS"))
                n_requests = parallel or int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
                requests = [compiled.create_infer_request() for _ in range(n_requests)]
                for batch in args.batch_sizes:
                    pixels = np.random.default_rng(0).standard_normal((batch, 3, *image_size), dtype=np.float32)
                    img_s = rate(partial(run_split, requests, pixels), batch, args.seconds)
                    results.setdefault((dtype, name, batch), []).append(img_s)
                    line = {"round": round_, "dtype": dtype, "variant": name, "streams": streams, "requests": n_requests, "batch": batch}
                    print(json.dumps({**line, "img_s": round(img_s, 2)}), flush=True)
    # What pooling outside the graph costs: pool_cls_mean over a batch of the model's hidden states.
    tokens = 1 + (image_size[0] // config.patch_size) * (image_size[1] // config.patch_size)
    hidden = torch.randn(8, tokens, config.hidden_size)
    started = time.perf_counter()
    for _ in range(200):
        pool_cls_mean(hidden, 0)
    pooling_ms = (time.perf_counter() - started) / 200 * 1000
    print(json.dumps({"loadavg_end": os.getloadavg(), "pool_cls_mean_ms_batch8": round(pooling_ms, 3)}))
    print("\ndtype | variant | " + " | ".join(f"b{b}" for b in args.batch_sizes) + "   (median img/s over rounds)")
    for dtype in args.dtypes.split(","):
        for name in chosen:
            medians = [statistics.median(results[(dtype, name, b)]) for b in args.batch_sizes]
            print(f"{dtype} | {name} | " + " | ".join(f"{m:.2f}" for m in medians))


if __name__ == "__main__":
    main()
