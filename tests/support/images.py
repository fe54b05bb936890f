"""Images as the API takes them: inline as data URIs, or over HTTP from the one address workers may fetch from."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from PIL import Image

from devtools.image_server import serve_images
from devtools.photos import BENCH, EXAMPLES
from tests.support.stack import IMAGE_HOST

# A host name no resolver takes: one label longer than DNS allows.
LONG_LABEL_HOST = "a" * 64 + ".example"


def data_uri(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def bench_thumbnails(side: int = 96) -> list[bytes]:
    """The bench photos as small JPEGs: small enough to travel with their admission (``api.request_groups``)."""
    thumbnails = []
    for path in sorted(BENCH.glob("*.jpg")):
        with Image.open(path) as image:
            image.thumbnail((side, side))
            out = io.BytesIO()
            image.convert("RGB").save(out, format="JPEG", quality=90)
            thumbnails.append(out.getvalue())
    return thumbnails


@contextmanager
def serve_photos(delay_s: float = 0.0, host: str = IMAGE_HOST) -> Iterator[str]:
    """The example photos over plain HTTP on the one address workers may fetch from; each answer
    can be made to take ``delay_s``, so work is still in progress when a test breaks something."""
    with serve_images(EXAMPLES, host, delay_s=delay_s) as served:
        yield served.base_url


@dataclass
class ImageServer:
    base_url: str

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"
