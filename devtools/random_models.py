"""Random-weight models built from the real Transformers config classes, saved like Hub checkpoints.

The Hub is unreachable from the team's machines, so tests and benchmarks build their models here and
load them through the same ``from_pretrained`` path a Hub id takes. Image processor settings copy the
published checkpoints' ``preprocessor_config.json`` (scaled down for the tiny presets).

    python -m devtools.random_models dinov2-small models/dinov2-small-random
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    BitImageProcessor,
    ConvNextConfig,
    DeiTConfig,
    DeiTImageProcessor,
    Dinov2Config,
    Dinov2WithRegistersConfig,
    DINOv3ViTConfig,
    DINOv3ViTImageProcessor,
    PretrainedConfig,
    ViTConfig,
    ViTImageProcessor,
)
from transformers.image_processing_utils import BaseImageProcessor
from transformers.models.auto.modeling_auto import MODEL_MAPPING

IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}


def _bit(shortest: int, crop: int) -> dict[str, Any]:
    """DINOv2 / WebSSL: resize shortest edge, bicubic, center crop, ImageNet statistics."""
    return {
        "size": {"shortest_edge": shortest},
        "crop_size": {"height": crop, "width": crop},
        "do_center_crop": True,
        "resample": 3,
        "do_convert_rgb": True,
        **IMAGENET,
    }


def _square(side: int, resample: int, stats: dict[str, Any]) -> dict[str, Any]:
    """ViT / DINOv1 / DINOv3: plain resize to a square."""
    return {"size": {"height": side, "width": side}, "resample": resample, **stats}


@dataclass(frozen=True)
class Preset:
    config_class: type[PretrainedConfig]
    config: dict[str, Any]
    processor_class: type[BaseImageProcessor]
    processor: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    # Tiny models for tests: same classes and processors as the Hub checkpoints, far fewer weights.
    "vit-tiny": Preset(
        ViTConfig,
        {**TINY, "intermediate_size": 64, "patch_size": 16, "image_size": 64},
        ViTImageProcessor,
        _square(64, 2, {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}),
    ),
    "dino-vit-tiny": Preset(ViTConfig, {**TINY, "intermediate_size": 64, "patch_size": 16, "image_size": 64}, ViTImageProcessor, _square(64, 3, IMAGENET)),
    "deit-tiny": Preset(
        ViTConfig,
        {**TINY, "intermediate_size": 64, "patch_size": 16, "image_size": 64},
        DeiTImageProcessor,
        {"size": {"height": 72, "width": 72}, "crop_size": {"height": 64, "width": 64}, "do_center_crop": True, "resample": 3, **IMAGENET},
    ),
    "deit-distilled-tiny": Preset(
        DeiTConfig,
        {**TINY, "intermediate_size": 64, "patch_size": 16, "image_size": 64},
        DeiTImageProcessor,
        {"size": {"height": 72, "width": 72}, "crop_size": {"height": 64, "width": 64}, "do_center_crop": True, "resample": 3, **IMAGENET},
    ),
    "dinov2-tiny": Preset(Dinov2Config, {**TINY, "mlp_ratio": 2, "patch_size": 14, "image_size": 56}, BitImageProcessor, _bit(64, 56)),
    "dinov2-registers-tiny": Preset(
        Dinov2WithRegistersConfig, {**TINY, "mlp_ratio": 2, "patch_size": 14, "image_size": 56, "num_register_tokens": 4}, BitImageProcessor, _bit(64, 56)
    ),
    "dinov3-tiny": Preset(
        DINOv3ViTConfig,
        {**TINY, "intermediate_size": 64, "patch_size": 16, "image_size": 64, "num_register_tokens": 4},
        DINOv3ViTImageProcessor,
        _square(64, 2, IMAGENET),
    ),
    "webssl-tiny": Preset(Dinov2Config, {**TINY, "mlp_ratio": 2, "patch_size": 16, "image_size": 64}, BitImageProcessor, _bit(64, 64)),
    "convnext-tiny": Preset(ConvNextConfig, {"hidden_sizes": [8, 16], "depths": [1, 1], "num_stages": 2}, BitImageProcessor, _bit(64, 56)),
    # Real shapes with random weights, for benchmarks and air-gapped trials: the cost is the real one.
    "dinov2-small": Preset(
        Dinov2Config,
        {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "mlp_ratio": 4, "patch_size": 14, "image_size": 518},
        BitImageProcessor,
        _bit(256, 224),
    ),
    "vit-base-16": Preset(
        ViTConfig,
        {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "patch_size": 16, "image_size": 224},
        ViTImageProcessor,
        _square(224, 2, {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}),
    ),
    "dinov3-small": Preset(
        DINOv3ViTConfig,
        {
            "hidden_size": 384,
            "num_hidden_layers": 12,
            "num_attention_heads": 6,
            "intermediate_size": 1536,
            "patch_size": 16,
            "image_size": 224,
            "num_register_tokens": 4,
        },
        DINOv3ViTImageProcessor,
        _square(224, 2, IMAGENET),
    ),
}


def build(preset_name: str, out_dir: Path, seed: int = 0) -> Path:
    """Save a random model and its image processor config to ``out_dir`` (reused when present)."""
    preset = PRESETS[preset_name]
    if (out_dir / "config.json").exists() and (out_dir / "preprocessor_config.json").exists():
        return out_dir
    torch.manual_seed(seed)
    config = preset.config_class(**preset.config)
    model = MODEL_MAPPING[type(config)](config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    preset.processor_class(**preset.processor).save_pretrained(out_dir)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build(args.preset, args.out_dir, args.seed))


if __name__ == "__main__":
    main()
