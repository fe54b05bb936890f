"""Messages that cross the queue: task payloads, per-image results, model descriptions."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.errors import ErrorCode

# On the wire both references keep the field name ``data`` they had before the split, so task
# messages already queued (a job's chunks can wait for hours) still read after an upgrade.
_WIRE = ConfigDict(frozen=True, validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)


class UrlRef(BaseModel):
    """An input image the worker fetches itself."""

    model_config = _WIRE

    kind: Literal["url"] = "url"
    index: int = Field(ge=0, description="Position in the request, or in the whole job.")
    url: str = Field(alias="data", description="The http(s) URL to fetch, already checked for form by the API.")


class BlobRef(BaseModel):
    """An input image whose bytes the API stored in Redis.

    Image bytes do not ride in the task message: the API stores them in a Redis hash under the
    item's index (a claim check), so messages stay small and no image is base64-encoded twice on
    its way.
    """

    model_config = _WIRE

    kind: Literal["blob"] = "blob"
    index: int = Field(ge=0, description="Position in the request, or in the whole job.")
    blob_key: str = Field(alias="data", description="The Redis hash holding the image bytes, under the item's index.")


# One input image, already checked for form by the API.
ImageRef = Annotated[UrlRef | BlobRef, Field(discriminator="kind")]


class EmbedPayload(BaseModel):
    """A synchronous request: results go to ``reply_key`` before ``deadline`` (epoch seconds)."""

    request_id: str
    model: str
    items: list[ImageRef]
    reply_key: str
    deadline: float


class EmbedRequests(BaseModel):
    """Synchronous requests for one model that an API process admitted together, sent as one task so
    that they share its cost; each is still started, answered, withdrawn and sent again on its own."""

    model: str
    # A round holds at most one batch of images (IMBEDDINGS_MAX_BATCH_SIZE, at most 1024), so as many requests.
    requests: list[EmbedPayload] = Field(min_length=1, max_length=1024)

    @model_validator(mode="after")
    def _one_model(self) -> EmbedRequests:
        if others := sorted({request.model for request in self.requests} - {self.model}):
            raise ValueError(f"every request of the task must be for model {self.model!r}; found {others}")
        return self


class JobChunkPayload(BaseModel):
    """A slice of an async job; results are stored by item index, so redelivery is harmless."""

    request_id: str
    job_id: str
    model: str
    items: list[ImageRef]
    owner: str = Field("", description="Key id of the job's owner, whose quota the items leave as they finish.")
    dimensions: int | None = Field(None, description="The job's truncation, checked against the model's size before anything is computed.")


class ItemError(BaseModel):
    """Why one image failed; the API adds the status and type its code stands for."""

    message: str
    code: ErrorCode


class ItemResult(BaseModel):
    """One image's outcome: both vectors or an error.

    The vectors are base64 text (float32, little-endian); on the wire they keep the short names
    ``cls`` and ``mean``, so results stored before the rename stay readable.
    """

    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)

    index: int
    cls_b64: str | None = Field(None, alias="cls")
    mean_b64: str | None = Field(None, alias="mean")
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
