"""The manifest: one image per line, as a URL, a data URI or a local file path."""

from __future__ import annotations

import base64
import hashlib
import mimetypes
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Manifest:
    path: Path
    lines: list[str]
    sha256: str

    @classmethod
    def read(cls, path: Path) -> Manifest:
        raw = path.read_bytes()
        lines = [line.strip() for line in raw.decode("utf-8").splitlines()]
        return cls(path, [line for line in lines if line and not line.startswith("#")], hashlib.sha256(raw).hexdigest())


def as_input(line: str, base_dir: Path) -> str:
    """What the API is sent for a manifest line: URLs and data URIs as they are, files as data URIs."""
    if line.startswith(("http://", "https://", "data:")):
        return line
    file = Path(line).expanduser()
    if not file.is_absolute():
        file = base_dir / file
    mime = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(file.read_bytes()).decode()}"
