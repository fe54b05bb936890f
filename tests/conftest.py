"""Real parts for the tests: a Redis server, tiny real models, worker and API processes."""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from devtools.image_server import serve_images
from devtools.photos import EXAMPLES
from devtools.processes import ServiceProcess, wait_until
from devtools.random_models import build
from devtools.redis_server import RedisServer, free_port

# The models the shared worker serves, one per family the service supports.
SERVED = ["dinov2-tiny", "vit-tiny", "dino-vit-tiny", "deit-tiny", "dinov2-registers-tiny", "dinov3-tiny", "webssl-tiny"]
DEFAULT = "dinov2-tiny"
# The image server tests fetch from binds here; only this address is allowed to the shared worker,
# so every other loopback address stays forbidden for the SSRF tests.
IMAGE_HOST = "127.0.0.2"


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


@pytest.fixture(scope="session")
def allow_list(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> Path:
    path = tmp_path_factory.mktemp("config") / "supported_models.txt"
    lines = ["# test allow-list", *[str(p) for name, p in tiny_models.items() if name not in ("convnext-tiny",)]]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop(graceful=False)


def model_id(models: dict[str, Path], name: str) -> str:
    return str(models[name])


@dataclass
class Service:
    base_url: str
    env: dict[str, str]
    models: dict[str, Path]
    api: ServiceProcess
    worker: ServiceProcess
    extra: dict[str, object] = field(default_factory=dict)

    def model(self, name: str) -> str:
        return model_id(self.models, name)

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, **{"timeout": 60, **kwargs})


def service_env(redis_url: str, allow_list: Path, models: dict[str, Path], **overrides: str) -> dict[str, str]:
    env = {
        "IMBEDDINGS_REDIS_URL": redis_url,
        "IMBEDDINGS_SUPPORTED_MODELS_FILE": str(allow_list),
        "IMBEDDINGS_DEFAULT_MODEL": model_id(models, DEFAULT),
        "IMBEDDINGS_WORKER_MODELS": ",".join(model_id(models, name) for name in SERVED),
        "IMBEDDINGS_DTYPE": "float32",
        "IMBEDDINGS_DEVICE": "cpu",
        "IMBEDDINGS_URL_ALLOWED_NETWORKS": f"{IMAGE_HOST}/32",
        "IMBEDDINGS_HEARTBEAT_INTERVAL_S": "1",
        "IMBEDDINGS_HEARTBEAT_TTL_S": "4",
        "IMBEDDINGS_LOG_JSON": "true",
        "IMBEDDINGS_WORKER_CONCURRENCY": "16",
        "IMBEDDINGS_WORKER_METRICS_PORT": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    env.update(overrides)
    return env


def start_api(env: dict[str, str], log_path: Path, port: int | None = None, launcher: Sequence[str] = ()) -> tuple[ServiceProcess, str]:
    port = port or free_port()
    api = ServiceProcess("api", {**env, "IMBEDDINGS_PORT": str(port), "IMBEDDINGS_HOST": "127.0.0.1"}, log_path, launcher).start()
    base_url = f"http://127.0.0.1:{port}"
    wait_until(lambda: _get_ok(f"{base_url}/health") or not api.alive(), 30, what="API /health")
    if not api.alive():
        raise RuntimeError(f"API exited:\n{api.log_text()[-3000:]}")
    return api, base_url


def start_worker(env: dict[str, str], log_path: Path, launcher: Sequence[str] = ()) -> ServiceProcess:
    if env.get("IMBEDDINGS_WORKER_METRICS_PORT", "0") == "0":
        env = {**env, "IMBEDDINGS_WORKER_METRICS_PORT": str(free_port())}
    return ServiceProcess("worker", env, log_path, launcher).start()


def wait_served(base_url: str, model: str, worker: ServiceProcess, timeout_s: float = 120, count: int = 1) -> None:
    def served() -> bool:
        if not worker.alive():
            raise RuntimeError(f"worker exited:\n{worker.log_text()[-3000:]}")
        try:
            card = httpx.get(f"{base_url}/v1/models/{model}", timeout=2).json()
        except httpx.HTTPError:
            return False
        return card.get("workers", 0) >= count

    wait_until(served, timeout_s, interval_s=0.25, what=f"a worker serving {model}")


def wait_worker_ready(worker: ServiceProcess, timeout_s: float = 120) -> None:
    """This worker (not merely some worker) has loaded its models and consumes its queues."""

    def ready() -> bool:
        if not worker.alive():
            raise RuntimeError(f"worker exited:\n{worker.log_text()[-3000:]}")
        return '"message": "worker ready"' in worker.log_text()

    wait_until(ready, timeout_s, interval_s=0.25, what="the worker to be ready")


def _get_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer, allow_list: Path, tiny_models: dict[str, Path]) -> Iterator[Service]:
    logs = tmp_path_factory.mktemp("logs")
    env = service_env(redis_server.url, allow_list, tiny_models)
    worker = start_worker(env, logs / "worker.log")
    api, base_url = start_api(env, logs / "api.log")
    try:
        for name in SERVED:
            wait_served(base_url, model_id(tiny_models, name), worker)
        yield Service(base_url, env, tiny_models, api, worker, {"logs": logs})
    finally:
        api.stop()
        worker.stop()
        if os.environ.get("IMBEDDINGS_TEST_SHOW_LOGS"):
            print(worker.log_text()[-5000:], api.log_text()[-5000:])


def data_uri(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


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


@pytest.fixture(scope="session")
def image_server() -> Iterator[ImageServer]:
    with serve_photos() as base_url:
        yield ImageServer(base_url)


@pytest.fixture
def slow_images() -> Iterator[str]:
    with serve_photos(delay_s=0.2) as base_url:
        yield base_url
