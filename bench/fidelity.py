"""What the approximate options cost in embedding cosine against the faithful float32 path."""

from __future__ import annotations

from pathlib import Path

import torch

from worker.images.decode import DecodeLimits, decode_image
from worker.model.embedder import Backend, resolve_backend
from worker.model.loader import load_model
from worker.model.preprocess import ProcessorPreprocessor

FULL = DecodeLimits(max_bytes=2**30, max_pixels=10**9, max_side=100_000)


def _embed(model_dir: Path, dtype: torch.dtype, images: list, jpeg_draft: bool = False, backend: Backend = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    loaded = load_model(str(model_dir), torch.device("cpu"), dtype, None, warmup_batch=1, backend=backend)
    preprocess = ProcessorPreprocessor(loaded.processor)
    limits = FULL.with_jpeg_draft(loaded.info.image_size) if jpeg_draft else FULL
    return loaded.embedder.embed(torch.stack([preprocess(decode_image(data, limits)) for data in images]))


def _min_cosine(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    return {name: round(float((x * y).sum(-1).min()), 6) for name, x, y in zip(("cls", "mean"), a, b)}


def fidelity(model_dir: Path, jpegs: list[bytes]) -> dict[str, dict[str, float]]:
    """Smallest cosine over the photos, CLS and MEAN, of each option against faithful float32."""
    reference = _embed(model_dir, torch.float32, jpegs)
    costs = {
        "bfloat16": _min_cosine(reference, _embed(model_dir, torch.bfloat16, jpegs)),
        "float16": _min_cosine(reference, _embed(model_dir, torch.float16, jpegs)),
        "jpeg_draft": _min_cosine(reference, _embed(model_dir, torch.float32, jpegs, jpeg_draft=True)),
    }
    if resolve_backend("auto", torch.device("cpu")) == "openvino":
        costs["openvino_float32"] = _min_cosine(reference, _embed(model_dir, torch.float32, jpegs, backend="openvino"))
        costs["openvino_bfloat16"] = _min_cosine(reference, _embed(model_dir, torch.bfloat16, jpegs, backend="openvino"))
    return costs
