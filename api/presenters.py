"""Worker results -> OpenAI embedding items: pooling choice, truncation, then the encoding asked for."""

from __future__ import annotations

from typing import Any

import numpy as np

from api.errors import ApiError
from api.schemas import Pooling
from api.served_models import check_dimensions
from shared.protocol import ItemResult
from shared.vectors import EncodingFormat, decode_f32, encode_f32, l2_normalize, quantise


def _shape(vector: np.ndarray, dimensions: int | None) -> np.ndarray:
    if dimensions is None:
        return vector
    check_dimensions(dimensions, vector.shape[0])
    return l2_normalize(vector[:dimensions])


def _encode(vector: np.ndarray, encoding_format: EncodingFormat) -> np.ndarray | str:
    # Arrays go to orjson as they are: it writes each float32's shortest form, and integers as integers.
    if encoding_format == "float":
        return vector
    if encoding_format == "base64":
        return encode_f32(vector)
    return quantise(vector, encoding_format)


def embedding_item(result: ItemResult, pooling: Pooling, encoding_format: EncodingFormat, dimensions: int | None, index: int | None = None) -> dict[str, Any]:
    assert result.cls is not None and result.mean is not None
    vectors = {"cls": _shape(decode_f32(result.cls), dimensions), "mean": _shape(decode_f32(result.mean), dimensions)}
    encoded = {name: _encode(vector, encoding_format) for name, vector in vectors.items()}
    return {"object": "embedding", "index": result.index if index is None else index, "embedding": encoded[pooling], "embeddings": encoded}


def embedding_dim(result: ItemResult) -> int:
    assert result.cls is not None
    return int(decode_f32(result.cls).shape[0])


def item_error_body(result: ItemResult) -> dict[str, Any]:
    assert result.error is not None
    return {"index": result.index, "error": result.error.model_dump()}


def first_failure(results: list[ItemResult], base_index: int = 0) -> ApiError | None:
    """The 400 (or 500 for a model failure) a synchronous request gets when any image failed."""
    failed = [r for r in results if r.error is not None]
    if not failed:
        return None
    first = failed[0]
    assert first.error is not None
    position = first.index - base_index
    more = f" ({len(failed) - 1} more input{'s' if len(failed) > 2 else ''} failed too)" if len(failed) > 1 else ""
    status = 500 if first.error.type == "server_error" else 400
    return ApiError(status, f"input[{position}]: {first.error.message}{more}", code=first.error.code, param=f"input[{position}]", type=first.error.type)
