"""Fixtures both test folders use: tiny real models and one cache of their OpenVINO conversions."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.random_models import build
from tests.support.stack import SERVED


@pytest.fixture(scope="session", autouse=True)
def openvino_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One cache of converted models for every worker of the session, as on a host whose workers
    share a disk: each tiny model is converted once, not once per worker start."""
    path = tmp_path_factory.mktemp("openvino-cache")
    previous = os.environ.get("IMBEDDINGS_OPENVINO_CACHE_DIR")
    os.environ["IMBEDDINGS_OPENVINO_CACHE_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("IMBEDDINGS_OPENVINO_CACHE_DIR")
    else:
        os.environ["IMBEDDINGS_OPENVINO_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    names = [*SERVED, "deit-distilled-tiny", "convnext-tiny"]
    models = {name: build(name, root / name) for name in names}
    # Listed in the allow-list, but served by no worker.
    models["unserved"] = shutil.copytree(models["dinov2-tiny"], root / "unserved")
    return models
