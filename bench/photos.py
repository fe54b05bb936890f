"""The benchmark's photos (``devtools/photos/bench``) re-encoded at a chosen size, so every scenario
decodes images of a known, stated cost."""

from __future__ import annotations

import io

from PIL import Image

from devtools.photos import BENCH


def bench_jpegs(side: int, upscale: bool = False) -> dict[str, bytes]:
    """Each photo as a quality-90 JPEG whose longest side is at most ``side`` (exactly ``side`` with
    ``upscale``), by file name."""
    encoded = {}
    for path in sorted(BENCH.glob("*.jpg")):
        image = Image.open(path).convert("RGB")
        if max(image.size) > side:
            image.thumbnail((side, side), Image.Resampling.LANCZOS)
        elif upscale and max(image.size) < side:
            scale = side / max(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        encoded[path.name] = buffer.getvalue()
    return encoded
