"""Where an image's bytes come from: the API's claim check in Redis, or a URL fetched later."""

from __future__ import annotations

from dataclasses import dataclass

from redis import Redis

from shared.protocol import ImageRef, ItemError, ItemResult


@dataclass(frozen=True)
class ImageInput:
    """One image ready for the pipeline: its bytes, or a URL still to fetch."""

    index: int
    data: bytes | None = None
    url: str | None = None


def load_inputs(redis: Redis, refs: list[ImageRef]) -> list[ImageInput | ItemResult]:
    """Read every stored image of a task in one round trip; a missing one is reported in place."""
    keys = [ref.data for ref in refs if ref.kind == "blob"]
    blobs = iter(redis.mget(keys) if keys else [])
    loaded: list[ImageInput | ItemResult] = []
    for ref in refs:
        if ref.kind == "url":
            loaded.append(ImageInput(ref.index, url=ref.data))
            continue
        data = next(blobs)
        if data is None:
            error = ItemError(message="the image's stored bytes expired before a worker reached them; submit it again", type="server_error", code="input_expired")
            loaded.append(ItemResult(index=ref.index, error=error))
        else:
            loaded.append(ImageInput(ref.index, data=data))
    return loaded
