"""CLS and MEAN from one forward pass's token sequence ``[CLS | REG_1..R | PATCH_1..N]``."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pool_cls_mean(last_hidden_state: torch.Tensor, num_register_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalized CLS token and mean of the patch tokens; registers never enter the mean.

    Pooling runs in float32 whatever the model's dtype, so reduced precision costs only what the
    forward pass itself loses.
    """
    hidden = last_hidden_state.float()
    cls = F.normalize(hidden[:, 0], dim=-1)
    mean = F.normalize(hidden[:, 1 + num_register_tokens :].mean(dim=1), dim=-1)
    return cls, mean
