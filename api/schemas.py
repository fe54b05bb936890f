"""Request and response bodies of the HTTP API (OpenAI embeddings conventions), with the builders of
the embedding items beside their schema. Error bodies live with their table in ``api.errors``."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidatorFunctionWrapHandler, create_model, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from api.errors import ApiError
from shared.errors import ErrorCode, oversized_dimensions
from shared.protocol import ItemResult, ModelShape
from shared.vectors import EncodingFormat, decode_f32, encode_f32, l2_normalize, quantise

Pooling = Literal["cls", "mean"]
# Items of ``input`` reported when several are malformed.
MAX_REPORTED_INPUT_ERRORS = 10


class ImageObject(BaseModel):
    """``{"type": "image", "image_url": ...}`` or ``{"type": "image", "image_base64": ...}``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["image"] = "image"
    image_url: str | None = Field(None, description="http(s) URL or data URI.")
    image_base64: str | None = Field(None, description="Base64-encoded image bytes (or a data URI).")

    @model_validator(mode="after")
    def _exactly_one(self) -> ImageObject:
        if (self.image_url is None) == (self.image_base64 is None):
            raise PydanticCustomError("image_object", "give exactly one of image_url or image_base64")
        return self


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"model": "facebook/dinov2-small", "input": "https://example.com/cat.jpg", "pooling": "cls"}]},
    )

    model: str | None = Field(None, description="Model id from /v1/models; the default model when absent.")
    input: str | list[str | ImageObject] = Field(description="One image (URL, data URI or base64) or a list of them.", min_length=1)
    encoding_format: EncodingFormat = Field(
        "float",
        description="float: JSON numbers; base64: little-endian float32 bytes; int8 / uint8: round(127 x) (+128 for uint8); "
        "binary / ubinary: sign bits packed 8 to a byte, as int8 (byte - 128) / uint8.",
    )
    pooling: Pooling = Field("cls", description="Which vector goes into `embedding`; both are always in `embeddings`.")
    dimensions: int | None = Field(None, ge=1, description="Keep the first N components, then re-normalize.")
    user: str | None = Field(None, description="Accepted for OpenAI compatibility; not used.")

    @field_validator("input", mode="wrap")
    @classmethod
    def _errors_by_position(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """Report a bad input as ``input[i]`` with one clear reason, not once per union branch."""
        if value == "" or value == []:
            raise PydanticCustomError("image_input", "input is empty: give at least one image")
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise PydanticCustomError("image_input", "must be an image (URL, data URI or base64 string) or a list of them")
        try:
            return handler(value)
        except ValidationError as exc:
            failure = exc
        # Only now, and only up to a few, are items checked one by one for readable errors: a list of
        # 100,000 bad items must not build 100,000 error objects.
        errors: list[InitErrorDetails] = []
        for position, item in enumerate(value):
            if isinstance(item, dict):
                try:
                    ImageObject.model_validate(item)
                except ValidationError as exc:
                    errors += [
                        InitErrorDetails(type=PydanticCustomError(e["type"], e["msg"]), loc=(position, *e["loc"]), input=e["input"]) for e in exc.errors()
                    ]
            elif not isinstance(item, str):
                reason = PydanticCustomError("image_input", "expected a URL, data URI or base64 string, or an image object")
                errors.append(InitErrorDetails(type=reason, loc=(position,), input=item))
            if len(errors) >= MAX_REPORTED_INPUT_ERRORS:
                break
        if errors:
            raise ValidationError.from_exception_data("input", errors)
        raise failure


class PooledVectors(BaseModel):
    cls: list[float] | list[int] | str
    mean: list[float] | list[int] | str


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | list[int] | str
    embeddings: PooledVectors


def _shape(vector: np.ndarray, dimensions: int | None) -> np.ndarray:
    if dimensions is None:
        return vector
    if dimensions > vector.shape[0]:
        raise ApiError(ErrorCode.INVALID_DIMENSIONS, oversized_dimensions(dimensions, vector.shape[0]), param="dimensions")
    return l2_normalize(vector[:dimensions])


def _encode(vector: np.ndarray, encoding_format: EncodingFormat) -> np.ndarray | str:
    # Arrays go to orjson as they are: it writes each float32's shortest form, and integers as integers.
    if encoding_format == "float":
        return vector
    if encoding_format == "base64":
        return encode_f32(vector)
    return quantise(vector, encoding_format)


def embedding_item(result: ItemResult, pooling: Pooling, encoding_format: EncodingFormat, dimensions: int | None) -> dict[str, Any]:
    """A worker's result as an ``EmbeddingItem``: pooling choice, truncation, then the encoding asked for.

    A plain dict, not the model: orjson writes its numpy arrays directly."""
    assert result.cls_b64 is not None and result.mean_b64 is not None
    vectors = {"cls": _shape(decode_f32(result.cls_b64), dimensions), "mean": _shape(decode_f32(result.mean_b64), dimensions)}
    encoded = {name: _encode(vector, encoding_format) for name, vector in vectors.items()}
    return {"object": "embedding", "index": result.index, "embedding": encoded[pooling], "embeddings": encoded}


def embedding_dim(result: ItemResult) -> int:
    """``Usage.embedding_dim`` of an untruncated result."""
    assert result.cls_b64 is not None
    return int(decode_f32(result.cls_b64).shape[0])


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Vision Transformer tokens processed (CLS + registers + patches per image).")
    total_tokens: int
    input_images: int
    embedding_dim: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[EmbeddingItem]
    usage: Usage


class _ModelCardHead(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "imbeddings"
    served: bool
    workers: int


# The model's shape follows the card's head, each field null until a worker has described the model.
ModelCard = create_model(
    "ModelCard",
    __base__=_ModelCardHead,
    __doc__="One model of the allow-list: whether it is served now, and what it looks like.",
    **{name: (field.annotation | None, None) for name, field in ModelShape.model_fields.items()},
)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
