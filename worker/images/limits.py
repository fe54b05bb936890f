"""The settings that bound one input image, gathered for the stages that enforce them: the URL fetch
(``worker.images.fetch``) and the decode (``worker.images.decode``, ``worker.images.structure``)."""

from __future__ import annotations

from dataclasses import dataclass

from shared.settings import Settings
from worker.images.decode import DecodeLimits
from worker.images.fetch import FetchLimits
from worker.images.structure import StructureLimits


@dataclass(frozen=True)
class InputLimits:
    fetch: FetchLimits
    decode: DecodeLimits

    @classmethod
    def from_settings(cls, settings: Settings) -> InputLimits:
        return cls(
            fetch=FetchLimits.from_strings(settings.url_fetch_timeout_s, settings.url_max_redirects, settings.max_image_bytes, settings.url_allowed_networks),
            decode=DecodeLimits(
                settings.max_image_bytes,
                settings.max_image_pixels,
                settings.max_image_side,
                structure=StructureLimits(settings.max_image_segments, settings.max_metadata_bytes, settings.jpeg_max_scans),
                max_decoded_bytes=settings.decode_max_bytes,
            ),
        )
