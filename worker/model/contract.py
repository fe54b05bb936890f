"""What a model must honour to be served: ``[CLS | REG | PATCH]`` tokens, and vectors that match
Transformers' float32 ones in whatever backend and precision it runs.

Each check raises ``ModelRefused`` with a message naming the model and what it got wrong, so a worker
configured with an unsuitable model stops at start-up and says why.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from worker.model.embedder import VisionEmbedder

# Below this cosine to Transformers' float32 vectors a backend or precision is broken, not approximate.
MIN_COSINE = 0.99


class ModelRefused(RuntimeError):
    """The model cannot be served: it does not load, or its tokens are not ``[CLS | REG | PATCH]``."""


def patch_size(config: PretrainedConfig) -> int:
    patch = getattr(config, "patch_size", None)
    if isinstance(patch, (tuple, list)):
        if len(set(patch)) != 1:
            raise ModelRefused(f"non-square patches {patch} are not supported")
        patch = patch[0]
    if not isinstance(patch, int) or patch <= 0:
        raise ModelRefused("its config has no patch_size: not a Vision Transformer")
    return patch


def check_token_contract(model_id: str, hidden: torch.Tensor, pixel_size: torch.Size, patch: int, num_registers: int) -> int:
    """The number of tokens per image, once ``hidden`` is shown to be ``[CLS | REG | PATCH]``."""
    if hidden.ndim != 3:
        raise ModelRefused(f"model {model_id!r} refused: its output has no token sequence (last_hidden_state shape {tuple(hidden.shape)})")
    height, width = pixel_size
    patches = (height // patch) * (width // patch)
    expected = 1 + num_registers + patches
    if hidden.shape[1] != expected:
        raise ModelRefused(
            f"model {model_id!r} refused: it produced {hidden.shape[1]} tokens for a {height}x{width} image, but the "
            f"token contract [CLS | {num_registers} registers | {patches} patches of {patch}px] needs {expected}"
        )
    return expected


def check_precision(
    model_id: str,
    embedder: VisionEmbedder,
    pixel_values: torch.Tensor,
    reference: tuple[torch.Tensor, torch.Tensor],
    dtype: torch.dtype,
    batch: int,
) -> tuple[float, float] | None:
    """The smallest cosines (CLS, MEAN) of the embedder's vectors for the one image ``pixel_values``,
    alone and repeated as a batch of ``batch``, to the float32 Transformers ``reference``; None when the
    embedder is that reference itself. Both sizes, because a backend may run them differently (OpenVINO
    splits a batch over its streams)."""
    if embedder.backend == "torch" and dtype == torch.float32:
        return None
    outputs = [embedder.embed(pixel_values), embedder.embed(pixel_values.expand(batch, -1, -1, -1))]
    cls_cos, mean_cos = (min(float((ref.cpu() * vectors[i]).sum(-1).min()) for vectors in outputs) for i, ref in enumerate(reference))
    if min(cls_cos, mean_cos) < MIN_COSINE:
        raise ModelRefused(
            f"model {model_id!r} refused: with backend {embedder.backend} and {dtype} its vectors have cosine "
            f"{min(cls_cos, mean_cos):.4f} to float32 Transformers"
        )
    return cls_cos, mean_cos
