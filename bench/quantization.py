"""``python -m bench.quantization``: recall@10 of the quantised encodings against float search.

The corpus is every photo in devtools/photos (bench and examples) with augmentations of each (flips,
crops, rotation, colour, blur, heavy JPEG, downscaling), embedded by real-shape random-weight models
through the worker's own loading, preprocessing and pooling. Every image is a query against all the
others; the truth is its ten nearest by float32 cosine, and each encoding is scored by how many of
them its own top ten finds, searched the way a vector store searches that encoding:

- ``int8 fixed``: the service's rule, ``round(127 x)``, integer dot product;
- ``int8 calibrated``: each dimension's [min, max] over the corpus mapped onto [-128, 127]
  (sentence-transformers' calibrated rule, calibrated on the very corpus searched: its best case),
  integer dot product;
- ``int8 calibrated, decoded``: the same codes turned back into floats before the dot product, as
  scalar-quantising stores (FAISS SQ8 and the like) do;
- ``int8 one scale``: one scale for the whole corpus, ``127 / max |x|``, integer dot product (a
  calibration that keeps integer dot products ranking like cosine);
- ``binary``: sign bits, Hamming distance.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from devtools.random_models import build
from shared.settings import REPO_ROOT
from shared.vectors import quantise
from worker.images.decode import DecodeLimits, decode_image
from worker.model.loader import load_model
from worker.model.pooling import pool_cls_mean
from worker.model.preprocess import ProcessorPreprocessor

PHOTOS = REPO_ROOT / "devtools" / "photos"
LIMITS = DecodeLimits(max_bytes=2**30, max_pixels=10**9, max_side=100_000)
K = 10


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def augmentations(image: Image.Image) -> list[bytes]:
    """The photo and ten edits of it a near-duplicate search should still match."""
    image = image.convert("RGB")
    width, height = image.size
    return [
        _jpeg(image),
        _jpeg(ImageOps.mirror(image)),
        _jpeg(image.crop((width // 10, height // 10, width - width // 10, height - height // 10))),
        _jpeg(image.crop((0, 0, width * 7 // 10, height * 7 // 10))),
        _jpeg(image.rotate(8, resample=Image.Resampling.BILINEAR, expand=False)),
        _jpeg(Image.eval(image, lambda v: min(255, int(v * 1.3)))),
        _jpeg(ImageOps.autocontrast(ImageOps.grayscale(image)).convert("RGB")),
        _jpeg(image.filter(ImageFilter.GaussianBlur(3))),
        _jpeg(image, quality=15),
        _jpeg(image.resize((max(1, width // 4), max(1, height // 4))).resize((width, height))),
        _jpeg(ImageOps.posterize(image, 3)),
    ]


def corpus() -> list[bytes]:
    paths = sorted(p for p in PHOTOS.rglob("*") if p.suffix.lower() in (".jpg", ".png", ".webp"))
    return [data for path in paths for data in augmentations(Image.open(path))]


def embed(model_dir: Path, images: list[bytes], batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    loaded = load_model(str(model_dir), torch.device("cpu"), torch.float32, None, warmup_batch=1)
    preprocess = ProcessorPreprocessor(loaded.processor)
    cls_rows, mean_rows = [], []
    for start in range(0, len(images), batch):
        pixels = torch.stack([preprocess(decode_image(data, LIMITS)) for data in images[start : start + batch]])
        with torch.inference_mode():
            cls, mean = pool_cls_mean(loaded.module(pixel_values=pixels).last_hidden_state, loaded.num_register_tokens)
        cls_rows.append(cls.numpy())
        mean_rows.append(mean.numpy())
    return np.concatenate(cls_rows), np.concatenate(mean_rows)


def _top_k(scores: np.ndarray) -> np.ndarray:
    scores = scores.astype(np.float64)
    np.fill_diagonal(scores, -np.inf)  # an image is not its own neighbour
    return np.argsort(-scores, axis=1, kind="stable")[:, :K]


def recall_at_k(truth: np.ndarray, found: np.ndarray) -> float:
    return float(np.mean([len(set(t) & set(f)) / K for t, f in zip(truth, found)]))


def calibrated_int8(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The codes, and the floats they decode to."""
    low, high = vectors.min(axis=0), vectors.max(axis=0)
    steps = np.where(high > low, (high - low) / 255, 1)
    codes = (np.rint((vectors - low) / steps) - 128).clip(-128, 127).astype(np.int8)
    return codes, low + (codes.astype(np.float32) + 128) * steps


def recalls(vectors: np.ndarray) -> dict[str, float]:
    truth = _top_k(vectors @ vectors.T)
    fixed = quantise(vectors, "int8").astype(np.int32)
    codes, decoded = calibrated_int8(vectors)
    calibrated = codes.astype(np.int32)
    one_scale = np.rint(vectors * (127 / np.abs(vectors).max())).astype(np.int32)
    bits = np.unpackbits(quantise(vectors, "ubinary"), axis=1)[:, : vectors.shape[1]].astype(np.int32)
    hamming = bits @ (1 - bits).T + (1 - bits) @ bits.T
    return {
        "int8 fixed": recall_at_k(truth, _top_k(fixed @ fixed.T)),
        "int8 calibrated": recall_at_k(truth, _top_k(calibrated @ calibrated.T)),
        "int8 calibrated, decoded": recall_at_k(truth, _top_k(decoded @ decoded.T)),
        "int8 one scale": recall_at_k(truth, _top_k(one_scale @ one_scale.T)),
        "binary": recall_at_k(truth, _top_k(-hamming)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.quantization", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="dinov2-small,vit-base-16", help="random-weight models with real shapes (devtools.random_models)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    images = corpus()
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for preset in args.presets.split(","):
            cls, mean = embed(build(preset, Path(workdir) / preset), images)
            for pooling, vectors in (("cls", cls), ("mean", mean)):
                row = {"model": preset, "pooling": pooling, "images": len(images), "dim": vectors.shape[1], **recalls(vectors)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    methods = ["int8 fixed", "int8 calibrated", "int8 calibrated, decoded", "int8 one scale", "binary"]
    print("\n| model | pooling | images | " + " | ".join(methods) + " |\n|" + "---|" * (3 + len(methods)))
    for row in rows:
        print(f"| {row['model']} | {row['pooling']} | {row['images']} | " + " | ".join(f"{row[m]:.3f}" for m in methods) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
