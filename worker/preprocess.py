"""RGB image -> the model's ``pixel_values``, exactly as the model's own image processor makes them."""

from __future__ import annotations

from typing import Protocol

import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor


class Preprocessor(Protocol):
    def __call__(self, image: Image.Image) -> torch.Tensor:
        """A float32 ``(3, H, W)`` tensor."""
        ...


class ProcessorPreprocessor:
    """The faithful path: the Transformers image processor loaded with the model."""

    def __init__(self, processor: BaseImageProcessor) -> None:
        self._processor = processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self._processor(images=image, return_tensors="pt")["pixel_values"][0]
