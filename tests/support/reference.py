"""What plain Transformers gives for an image: the yardstick the service is held to."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel
from transformers.image_transforms import convert_to_rgb


@cache
def _load(model_dir: str) -> tuple[object, torch.nn.Module]:
    return AutoImageProcessor.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()


def reference_vectors(model_dir: Path, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """AutoImageProcessor -> AutoModel -> CLS and patch-token MEAN (registers excluded), L2-normalized.

    The image goes through Transformers' own ``convert_to_rgb`` first (transparency on white), as a
    user would do for processors that do not convert by themselves (ViT's does not).
    """
    processor, model = _load(str(model_dir))
    image = Image.fromarray(convert_to_rgb(image, return_numpy=True))
    registers = int(getattr(model.config, "num_register_tokens", 0) or 0)
    with torch.inference_mode():
        hidden = model(**processor(images=image, return_tensors="pt")).last_hidden_state[0]
    cls = hidden[0].numpy()
    mean = hidden[1 + registers :].mean(dim=0).numpy()
    return cls / np.linalg.norm(cls), mean / np.linalg.norm(mean)
