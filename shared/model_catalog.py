"""The allow-list of models (``supported_models.txt``): one id per line, ``#`` starts a comment."""

from __future__ import annotations

from pathlib import Path


class CatalogError(ValueError):
    pass


def read_allow_list(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(f"cannot read the model allow-list {path}: {exc.strerror}") from None
    models: list[str] = []
    for line in text.splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry and entry not in models:
            models.append(entry)
    return models


def allowed_models(path: Path, default_model: str) -> list[str]:
    """The listed models plus the configured default model, which the operator chose explicitly."""
    models = read_allow_list(path)
    if default_model not in models:
        models.insert(0, default_model)
    return models
