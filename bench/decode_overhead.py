"""``python -m bench.decode_overhead``: what decoding in a subprocess costs per image.

CPU seconds per image of decoding a 1024 x 1024 JPEG to an RGB array in the calling thread, and
through ``DecodePool`` (the worker's share and the decode child's), with the default settings.
CPU time rather than wall time, so that a busy machine changes the figures little.
``--jpeg-draft`` measures each round twice, without and with IMBEDDINGS_JPEG_DRAFT's reduced-scale
decoding (for a 224-px model input).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
from PIL import Image

from devtools.photos import BENCH, encode
from shared.settings import Settings
from worker.images.decode import ResizeRule, decode_image
from worker.images.decode_pool import DecodePool
from worker.images.limits import InputLimits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jpeg-draft", action="store_true", help="alternate rounds without and with JPEG draft decoding")
    args = parser.parse_args()
    settings = Settings()
    exact = replace(InputLimits.from_settings(settings).decode, resize=ResizeRule(shortest_edge=256))
    variants = {False: exact, True: exact.with_jpeg_draft((224, 224))} if args.jpeg_draft else {False: exact}
    data = encode(Image.open(BENCH / "astronaut_1024x1024.jpg").convert("RGB"), "JPEG", quality=90)
    pool = DecodePool(1, settings.decode_cpu_seconds, settings.decode_max_bytes)
    try:
        pool.decode(data, exact)
        (child,) = pool._all
        for draft, limits in [item for _ in range(args.rounds) for item in variants.items()]:
            started = time.process_time()
            for _ in range(args.images):
                int(np.array(decode_image(data, limits)).max())  # the preprocessor reads every pixel
            in_process = (time.process_time() - started) / args.images
            started, child_started = time.process_time(), child.cpu_seconds()
            for _ in range(args.images):
                int(pool.decode(data, limits).max())
            worker = (time.process_time() - started) / args.images
            decoder = (child.cpu_seconds() - child_started) / args.images
            print(
                json.dumps(
                    {
                        "jpeg_draft": draft,
                        "in_process_ms": round(in_process * 1000, 2),
                        "worker_ms": round(worker * 1000, 2),
                        "decoder_ms": round(decoder * 1000, 2),
                        "overhead_ms": round((worker + decoder - in_process) * 1000, 2),
                    }
                )
            )
    finally:
        pool.close()


if __name__ == "__main__":
    main()
