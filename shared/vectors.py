"""Vectors on the wire: little-endian float32 (base64), and the storage-ready quantised encodings.

Quantised encodings follow Cohere's ``embedding_types`` and sentence-transformers'
``quantize_embeddings``:

- ``int8``: ``round(x * 127)``, each component of an L2-normalised vector lies in [-1, 1], so the
  scale is fixed and the same for every vector, model and request: two int8 vectors compare by
  integer dot product exactly as their float vectors compare by cosine, up to the step 1/127. (A
  per-dimension range calibrated on a corpus was measured against it; see the README.)
- ``uint8``: the int8 value + 128.
- ``binary`` / ``ubinary``: one bit per component, 1 where the component is > 0, packed eight to a
  byte (first component in the high bit, zero-padded to a whole byte), as int8 (byte - 128) or uint8.
"""

from __future__ import annotations

import base64
from typing import Literal

import numpy as np

_F32_LE = np.dtype("<f4")

QuantisedEncoding = Literal["int8", "uint8", "binary", "ubinary"]
# float and base64 (float32) are what the openai client knows; the others are storage encodings.
EncodingFormat = Literal["float", "base64", "int8", "uint8", "binary", "ubinary"]
QUANTISED_ENCODINGS: tuple[QuantisedEncoding, ...] = ("int8", "uint8", "binary", "ubinary")
INT8_SCALE = 127.0


def encode_f32(vector: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(vector, dtype=_F32_LE).tobytes()).decode("ascii")


def decode_f32(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=_F32_LE)


def l2_normalize(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def quantise(vector: np.ndarray, encoding: QuantisedEncoding) -> np.ndarray:
    """An L2-normalised float vector (or a matrix of them, one per row) in a storage encoding."""
    if encoding in ("int8", "uint8"):
        scaled = np.clip(np.rint(np.asarray(vector, dtype=np.float32) * INT8_SCALE), -INT8_SCALE, INT8_SCALE).astype(np.int8)
        return scaled if encoding == "int8" else (scaled.astype(np.int16) + 128).astype(np.uint8)
    packed = np.packbits(np.asarray(vector) > 0, axis=-1)
    return packed if encoding == "ubinary" else (packed.astype(np.int16) - 128).astype(np.int8)


def dequantise_int8(values: np.ndarray) -> np.ndarray:
    """The float vector an int8 (or uint8) vector stands for, to within half a step (0.5 / 127)."""
    values = np.asarray(values)
    signed = values.astype(np.float32) - (128 if values.dtype == np.uint8 else 0)
    return signed / INT8_SCALE


def unpack_bits(values: np.ndarray, dim: int) -> np.ndarray:
    """The 0/1 bits of a binary (int8) or ubinary (uint8) vector, ``dim`` of them."""
    values = np.asarray(values)
    unsigned = (values.astype(np.int16) + 128).astype(np.uint8) if values.dtype == np.int8 else values.astype(np.uint8)
    return np.unpackbits(unsigned, axis=-1)[..., :dim]
