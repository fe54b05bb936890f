"""Messages that cross the queue: task payloads, per-image results, model descriptions."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ImageRef(BaseModel):
    """One input image, already checked for form by the API.

    Image bytes do not ride in the task message: the API stores them in the Redis hash named by
    ``data``, under the item's index (a claim check), so messages stay small and no image is
    base64-encoded twice on its way.
    """

    model_config = ConfigDict(frozen=True)

    index: int = Field(ge=0, description="Position in the request, or in the whole job.")
    kind: Literal["url", "blob"]
    data: str = Field(description="The URL to fetch, or the Redis hash holding the image bytes.")


class EmbedPayload(BaseModel):
    """A synchronous request: results go to ``reply_key`` before ``deadline`` (epoch seconds)."""

    request_id: str
    model: str
    items: list[ImageRef]
    reply_key: str
    deadline: float


class JobChunkPayload(BaseModel):
    """A slice of an async job; results are stored by item index, so redelivery is harmless."""

    request_id: str
    job_id: str
    model: str
    items: list[ImageRef]
    owner: str = Field("", description="Key id of the job's owner, whose quota the items leave as they finish.")
    dimensions: int | None = Field(None, description="The job's truncation, checked against the model's size before anything is computed.")


class ItemError(BaseModel):
    message: str
    type: str = "invalid_request_error"
    code: str


class ItemResult(BaseModel):
    """One image's outcome: both vectors (base64 float32, little-endian) or an error."""

    index: int
    cls: str | None = None
    mean: str | None = None
    tokens: int | None = None
    error: ItemError | None = None


class ModelInfo(BaseModel):
    """What a worker learnt about a model when it loaded it (shown by ``/v1/models``)."""

    id: str
    model_type: str
    dim: int
    patch_size: int
    image_size: tuple[int, int]
    num_register_tokens: int
    tokens_per_image: int
    dtype: str
    device: str
    backend: str = "torch"
