"""The direct preprocessing path gives pixel_values bit-for-bit equal to the image processor's.

Checked on every real photo for each processor family (BiT for DINOv2/WebSSL, ViT for ViT/DINOv1,
DeiT, DINOv3), at the real published processor settings.
"""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from devtools.photos import bench_paths, decoding_variants, example_paths
from devtools.random_models import PRESETS
from worker.images.decode import DecodeLimits, decode_image
from worker.model.loader import probe_image
from worker.model.preprocess import DirectPreprocessor, ProcessorPreprocessor, choose_preprocessor

FAMILIES = {"BiT (DINOv2, WebSSL)": "dinov2-small", "ViT (ViT, DINOv1)": "vit-base-16", "DINOv3": "dinov3-small", "DeiT": "deit-tiny"}
LIMITS = DecodeLimits(max_bytes=2**30, max_pixels=10**9, max_side=100_000)


def _photos() -> list[Image.Image]:
    images = [decode_image(p.read_bytes(), LIMITS) for p in [*bench_paths(), *example_paths()]]
    return images + [decode_image(v.data, LIMITS) for v in decoding_variants()]


@pytest.mark.parametrize("family", FAMILIES)
def test_direct_path_is_bit_identical(family: str) -> None:
    preset = PRESETS[FAMILIES[family]]
    processor = preset.processor_class(**preset.processor)
    exact, direct = ProcessorPreprocessor(processor), DirectPreprocessor(processor)
    for image in _photos():
        expected = exact(image)
        got = direct(image)
        assert got.shape == expected.shape and got.dtype == torch.float32
        assert torch.equal(got, expected), f"{family}: max |difference| {(got - expected).abs().max().item():.3g}"


def test_choice_falls_back_when_paths_disagree(monkeypatch: pytest.MonkeyPatch) -> None:
    preset = PRESETS["dinov2-small"]
    processor = preset.processor_class(**preset.processor)
    assert isinstance(choose_preprocessor(processor, "fast", probe_image()), DirectPreprocessor)
    assert isinstance(choose_preprocessor(processor, "exact", probe_image()), ProcessorPreprocessor)

    class Skewed(DirectPreprocessor):
        def __call__(self, image: Image.Image) -> torch.Tensor:
            return super().__call__(image) + 1e-3

    monkeypatch.setattr("worker.model.preprocess.DirectPreprocessor", Skewed)
    assert isinstance(choose_preprocessor(processor, "fast", probe_image()), ProcessorPreprocessor)


def test_jpeg_draft_is_bounded() -> None:
    """The opt-in draft decode keeps at least twice the model's input size."""
    data = bench_paths()[2].read_bytes()  # 1600x1200
    full = decode_image(data, LIMITS)
    limits = LIMITS.with_jpeg_draft((224, 224))
    assert limits.jpeg_draft_size == (448, 448)
    draft = decode_image(data, limits)
    assert draft.size == (800, 600) and full.size == (1600, 1200)
    assert Image.open(io.BytesIO(data)).format == "JPEG"
