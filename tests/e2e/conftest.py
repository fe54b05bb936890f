"""Fixtures of the whole-process tests: Redis servers, the shared service, and image servers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.redis_server import RedisServer
from tests.support.images import ImageServer, serve_photos
from tests.support.stack import DEFAULT, SERVED, Stack, private_stack, running_redis, wait_served


@pytest.fixture(scope="session")
def allow_list(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> Path:
    path = tmp_path_factory.mktemp("config") / "supported_models.txt"
    lines = ["# test allow-list", *[str(p) for name, p in tiny_models.items() if name not in ("convnext-tiny",)]]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, for a stack whose state no other test may see or disturb."""
    with running_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer, allow_list: Path, tiny_models: dict[str, Path]) -> Iterator[Stack]:
    """The stack most tests share: one worker serving every model in ``SERVED``, and an API."""
    logs = tmp_path_factory.mktemp("logs")
    served = ",".join(str(tiny_models[name]) for name in SERVED)
    with private_stack(logs, redis_server.url, allow_list, tiny_models, model=DEFAULT, IMBEDDINGS_WORKER_MODELS=served) as stack:
        try:
            for name in SERVED:
                wait_served(stack.base_url, stack.model(name), stack.worker)
            yield stack
        finally:
            if os.environ.get("IMBEDDINGS_TEST_SHOW_LOGS"):
                print(stack.worker.log_text()[-5000:], stack.api.log_text()[-5000:])


@pytest.fixture(scope="session")
def image_server() -> Iterator[ImageServer]:
    with serve_photos() as base_url:
        yield ImageServer(base_url)


@pytest.fixture
def slow_images() -> Iterator[str]:
    with serve_photos(delay_s=0.2) as base_url:
        yield base_url
