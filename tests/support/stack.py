"""Starting the service's real parts for a test: a Redis server, worker and API processes, and the
environment that points them at each other and at the tiny models."""

from __future__ import annotations

import signal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from devtools.processes import ServiceProcess, wait_until
from devtools.redis_server import RedisServer, free_port

# The models the shared worker serves, one per family the service supports.
SERVED = ["dinov2-tiny", "vit-tiny", "dino-vit-tiny", "deit-tiny", "dinov2-registers-tiny", "dinov3-tiny", "webssl-tiny"]
DEFAULT = "dinov2-tiny"
# The image server tests fetch from binds here; only this address is allowed to the shared worker,
# so every other loopback address stays forbidden for the SSRF tests.
IMAGE_HOST = "127.0.0.2"
# What the tests' environment sets for speed; a test that must run with the defaults unsets them.
SET_FOR_SPEED = ("IMBEDDINGS_HEARTBEAT_INTERVAL_S", "IMBEDDINGS_HEARTBEAT_TTL_S", "OMP_NUM_THREADS")


def model_id(models: dict[str, Path], name: str) -> str:
    return str(models[name])


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


def one_model_env(redis_url: str, allow_list: Path, models: dict[str, Path], model: str = "vit-tiny", **overrides: str) -> dict[str, str]:
    """The environment of a service whose workers serve ``model`` alone, its default."""
    served = model_id(models, model)
    return service_env(redis_url, allow_list, models, **{"IMBEDDINGS_DEFAULT_MODEL": served, "IMBEDDINGS_WORKER_MODELS": served, **overrides})


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


@contextmanager
def running_redis(data_dir: Path, **options: Any) -> Iterator[RedisServer]:
    """A Redis server of the test's own (``options`` as ``RedisServer`` takes them), killed afterwards."""
    server = RedisServer(data_dir, **options).start()
    try:
        yield server
    finally:
        server.stop(graceful=False)


@dataclass
class Stack:
    """An API and its workers, sharing one environment (``logs`` holds their log files)."""

    base_url: str
    env: dict[str, str]
    models: dict[str, Path]
    api: ServiceProcess
    logs: Path
    workers: list[ServiceProcess] = field(default_factory=list)

    @property
    def worker(self) -> ServiceProcess:
        return self.workers[0]

    @property
    def default_model(self) -> str:
        return self.env["IMBEDDINGS_DEFAULT_MODEL"]

    def model(self, name: str) -> str:
        return model_id(self.models, name)

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, **{"timeout": 60, **kwargs})

    def add_worker(self, **overrides: str) -> ServiceProcess:
        """One more worker on the stack's environment (``overrides`` on top), stopped with the stack."""
        worker = start_worker({**self.env, **overrides}, self.logs / f"worker-{len(self.workers)}.log")
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        self.api.stop()
        for worker in self.workers:
            if worker.alive():
                worker.send(signal.SIGCONT)  # a frozen worker could not act on the stop signal
            worker.stop()


@contextmanager
def private_stack(
    logs: Path,
    redis_url: str,
    allow_list: Path,
    models: dict[str, Path],
    model: str = "vit-tiny",
    workers: int = 1,
    unset: Sequence[str] = (),
    served_timeout_s: float = 120,
    **overrides: str,
) -> Iterator[Stack]:
    """``workers`` workers and an API on the Redis at ``redis_url``, ``model`` their default and (unless
    ``overrides`` set ``IMBEDDINGS_WORKER_MODELS``) the only model served; ``overrides`` go on top of the
    tests' environment and the variables in ``unset`` are left at their defaults. Yields once every
    worker serves the default model; stops the API and every worker afterwards, added ones too."""
    env = one_model_env(redis_url, allow_list, models, model, **overrides)
    for name in unset:
        env.pop(name)
    started = [start_worker(env, logs / f"worker-{n}.log") for n in range(workers)]
    try:
        api, base_url = start_api(env, logs / "api.log")
    except BaseException:
        for worker in started:
            worker.stop()
        raise
    stack = Stack(base_url, env, models, api, logs, started)
    try:
        for worker in started:
            wait_served(base_url, stack.default_model, worker, timeout_s=served_timeout_s, count=workers)
        yield stack
    finally:
        stack.stop()
