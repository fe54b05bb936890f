"""The manifest: the images to embed, in order, each with an optional id.

Three forms, told apart by the file name:

- any other name: one image per line (an http(s) URL, a data URI or a local file path), or
  ``id<TAB>image`` on every line; blank lines and lines starting with ``#`` are skipped;
- ``.csv``: a header naming an ``id`` and an ``image`` column (other columns are ignored);
- ``.jsonl`` / ``.ndjson``: one object per line with ``id`` (string or integer) and ``image``.

Ids must be unique: they become the key a vector store upserts on.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import mimetypes
from dataclasses import dataclass
from pathlib import Path


class ManifestError(ValueError):
    pass


@dataclass(frozen=True)
class Manifest:
    path: Path
    images: list[str]
    ids: list[str] | None  # None when the manifest gives none: rows are then identified by number
    sha256: str

    @classmethod
    def read(cls, path: Path) -> Manifest:
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ManifestError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        suffix = path.suffix.lower()
        rows = _csv(path, text) if suffix == ".csv" else _jsonl(path, text) if suffix in (".jsonl", ".ndjson") else _lines(path, text)
        ids = [row_id for _, row_id, _ in rows]
        images = [image for _, _, image in rows]
        if any(row_id is not None for row_id in ids):
            _check_unique(path, [(where, row_id) for where, row_id, _ in rows])
        return cls(path, images, None if all(row_id is None for row_id in ids) else [str(row_id) for row_id in ids], hashlib.sha256(raw).hexdigest())


Row = tuple[str, str | None, str]  # where it was read (for messages), its id, its image


def _lines(path: Path, text: str) -> list[Row]:
    rows: list[Row] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        row_id, tab, image = line.partition("\t")
        rows.append((f"{path}:{number}", row_id.strip(), image.strip()) if tab else (f"{path}:{number}", None, line))
    with_ids = [row for row in rows if row[1] is not None]
    if with_ids and len(with_ids) != len(rows):
        missing = next(row for row in rows if row[1] is None)
        raise ManifestError(f"{missing[0]}: no id<TAB> on this line, but other lines have ids (give every line an id, or none)")
    for where, row_id, image in rows:
        if row_id == "" or not image:
            raise ManifestError(f"{where}: expected id<TAB>image, with both parts non-empty")
    return rows


def _csv(path: Path, text: str) -> list[Row]:
    reader = csv.DictReader(io.StringIO(text))
    missing = {"id", "image"} - set(reader.fieldnames or [])
    if missing:
        raise ManifestError(f"{path}: the CSV header must name the columns id and image (missing: {', '.join(sorted(missing))}; header: {reader.fieldnames})")
    rows: list[Row] = []
    for record in reader:
        where = f"{path}:{reader.line_num}"
        row_id, image = (record.get("id") or "").strip(), (record.get("image") or "").strip()
        if not row_id or not image:
            raise ManifestError(f"{where}: both id and image must be non-empty")
        rows.append((where, row_id, image))
    return rows


def _jsonl(path: Path, text: str) -> list[Row]:
    rows: list[Row] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ManifestError(f"{where}: not JSON ({exc})") from None
        if not isinstance(record, dict) or not isinstance(record.get("image"), str) or not record["image"].strip():
            raise ManifestError(f'{where}: expected an object with "id" and "image" (a URL, data URI or file path)')
        row_id = record.get("id")
        if isinstance(row_id, bool) or not isinstance(row_id, (str, int)) or str(row_id) == "":
            raise ManifestError(f'{where}: "id" must be a non-empty string or an integer')
        rows.append((where, str(row_id), record["image"].strip()))
    return rows


def _check_unique(path: Path, ids: list[tuple[str, str | None]]) -> None:
    first: dict[str, str] = {}
    for where, row_id in ids:
        assert row_id is not None
        if row_id in first:
            raise ManifestError(f"{where}: id {row_id!r} already used at {first[row_id]}; ids must be unique")
        first[row_id] = where


def as_input(image: str, base_dir: Path) -> str:
    """What the API is sent for a manifest image: URLs and data URIs as they are, files as data URIs."""
    if image.startswith(("http://", "https://", "data:")):
        return image
    file = Path(image).expanduser()
    if not file.is_absolute():
        file = base_dir / file
    mime = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(file.read_bytes()).decode()}"
