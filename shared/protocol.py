"""Messages that cross the queue: task payloads, per-image results, model descriptions."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class UrlRef(BaseModel):
    """An input image the worker fetches itself."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["url"] = "url"
    index: int = Field(ge=0, description="Position in the request, or in the whole job.")
    url: str = Field(description="The http(s) URL to fetch, already checked for form by the API.")


class BlobRef(BaseModel):
    """An input image whose bytes the API stored in Redis.

    Image bytes do not ride in the task message: the API stores them in a Redis hash under the
    item's index (a claim check), so messages stay small and no image is base64-encoded twice on
    its way.
    """

    model_config = ConfigDict(frozen=True)

    kind: Literal["blob"] = "blob"
    index: int = Field(ge=0, description="Position in the request, or in the whole job.")
    blob_key: str = Field(description="The Redis hash holding the image bytes, under the item's index.")


# One input image, already checked for form by the API.
ImageRef = Annotated[UrlRef | BlobRef, Field(discriminator="kind")]


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


class ModelShape(BaseModel):
    """What a model looks like, as a worker learnt it when it loaded the model (``/v1/models`` shows it)."""

    dim: int
    patch_size: int
    image_size: tuple[int, int]
    num_register_tokens: int
    tokens_per_image: int
    model_type: str
    dtype: str
    device: str


class ModelInfo(ModelShape):
    """A worker's announcement of a model it serves (the worker registry's ``model-info``)."""

    id: str
    backend: str = "torch"
