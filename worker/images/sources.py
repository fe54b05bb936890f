"""Where an image's bytes come from: the API's claim check in Redis, or a URL fetched later."""

from __future__ import annotations

from dataclasses import dataclass

from redis import Redis

from shared.errors import ErrorCode
from shared.protocol import BlobRef, ImageRef, ItemError, ItemResult, UrlRef
from shared.store.requests import read_image_bytes


@dataclass(frozen=True)
class ImageInput:
    """One image ready for the pipeline: its bytes, or a URL still to fetch."""

    index: int
    data: bytes | None = None
    url: str | None = None


def load_inputs(redis: Redis, refs: list[ImageRef]) -> list[ImageInput | ItemResult]:
    """Read a task's stored images (one round trip); a missing one is reported in place."""
    return inputs_from(refs, read_image_bytes(redis, [ref for ref in refs if isinstance(ref, BlobRef)]))


def inputs_from(refs: list[ImageRef], stored_bytes: list[bytes | None]) -> list[ImageInput | ItemResult]:
    """The pipeline's inputs, given the bytes read for the refs' ``BlobRef``s (in their order; None
    where they expired, reported in place)."""
    stored = iter(stored_bytes)
    loaded: list[ImageInput | ItemResult] = []
    for ref in refs:
        if isinstance(ref, UrlRef):
            loaded.append(ImageInput(ref.index, url=ref.url))
        elif (data := next(stored)) is None:
            error = ItemError(message="the image's stored bytes expired before a worker reached them; submit it again", code=ErrorCode.INPUT_EXPIRED)
            loaded.append(ItemResult(index=ref.index, error=error))
        else:
            loaded.append(ImageInput(ref.index, data=data))
    return loaded
