"""Where an image's bytes come from: the API's claim check in Redis, or a URL fetched later."""

from __future__ import annotations

from dataclasses import dataclass

from redis import Redis

from shared.errors import ErrorCode
from shared.protocol import ImageRef, ItemError, ItemResult


@dataclass(frozen=True)
class ImageInput:
    """One image ready for the pipeline: its bytes, or a URL still to fetch."""

    index: int
    data: bytes | None = None
    url: str | None = None


def load_inputs(redis: Redis, refs: list[ImageRef]) -> list[ImageInput | ItemResult]:
    """Read a task's stored images (one round trip per hash); a missing one is reported in place."""
    fields: dict[str, list[str]] = {}
    for ref in refs:
        if ref.kind == "blob":
            fields.setdefault(ref.data, []).append(str(ref.index))
    blobs: dict[tuple[str, str], bytes | None] = {}
    for key, names in fields.items():
        blobs.update(zip(((key, name) for name in names), redis.hmget(key, names)))
    loaded: list[ImageInput | ItemResult] = []
    for ref in refs:
        if ref.kind == "url":
            loaded.append(ImageInput(ref.index, url=ref.data))
            continue
        data = blobs[(ref.data, str(ref.index))]
        if data is None:
            error = ItemError(message="the image's stored bytes expired before a worker reached them; submit it again", code=ErrorCode.INPUT_EXPIRED)
            loaded.append(ItemResult(index=ref.index, error=error))
        else:
            loaded.append(ImageInput(ref.index, data=data))
    return loaded
