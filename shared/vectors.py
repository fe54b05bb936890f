"""Vectors on the wire: little-endian float32, base64 encoded."""

from __future__ import annotations

import base64

import numpy as np

_F32_LE = np.dtype("<f4")


def encode_f32(vector: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(vector, dtype=_F32_LE).tobytes()).decode("ascii")


def decode_f32(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=_F32_LE)


def l2_normalize(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector
