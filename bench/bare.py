"""The ceilings the service is measured against: the model alone, and a plain in-process loop."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor

from worker.model.loader import LoadedModel
from worker.model.pooling import pool_cls_mean


def rate(step: Callable[[], object], images_per_step: int, seconds: float) -> float:
    """Images per second of calling ``step`` (``images_per_step`` images each) for ``seconds``, after one warm-up call."""
    step()  # warm-up
    started = time.perf_counter()
    count = 0
    while time.perf_counter() - started < seconds:
        step()
        count += images_per_step
    return count / (time.perf_counter() - started)


def model_only(model: LoadedModel, batch_sizes: list[int], seconds: float) -> dict[int, float]:
    """img/s of the model's forward pass and pooling alone on random pixels, per batch size."""
    height, width = model.info.image_size
    rates = {}
    for batch in batch_sizes:
        pixels = torch.randn(batch, 3, height, width)
        rates[batch] = rate(partial(model.embedder.embed, pixels), batch, seconds)
    return rates


def _loop_step(model: LoadedModel, model_dir: Path, jpegs: list[bytes], batch: int) -> Callable[[], None]:
    """One step of what a user would write: decode ``batch`` JPEGs, the Transformers processor, a PyTorch forward, pool."""
    processor = AutoImageProcessor.from_pretrained(model_dir)
    cursor = 0

    def step() -> None:
        nonlocal cursor
        images = [Image.open(io.BytesIO(jpegs[(cursor + i) % len(jpegs)])).convert("RGB") for i in range(batch)]
        cursor += batch
        pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(model.device, model.dtype)
        with torch.inference_mode():
            pool_cls_mean(model.module(pixel_values=pixels).last_hidden_state, model.num_register_tokens)

    return step


def in_process_loop(model: LoadedModel, model_dir: Path, jpegs: list[bytes], batch: int, seconds: float) -> float:
    """img/s of the loop a user would write, at ``batch`` images per step."""
    return rate(_loop_step(model, model_dir, jpegs, batch), batch, seconds)


def in_process_latencies_s(model: LoadedModel, model_dir: Path, jpegs: list[bytes], images: int) -> list[float]:
    """Seconds per image of the same loop fed one image at a time (decode, processor, forward, pool)."""
    step = _loop_step(model, model_dir, jpegs, 1)
    step()  # warm-up
    latencies = []
    for _ in range(images):
        started = time.perf_counter()
        step()
        latencies.append(time.perf_counter() - started)
    return latencies
