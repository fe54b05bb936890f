"""The token contract, checked when a worker process starts: a model it refuses stops it, saying which and why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from shared.settings import REPO_ROOT


def _worker_exit(redis_url: str, allow_list: Path, model: str, timeout_s: float, **extra: str) -> subprocess.CompletedProcess[str]:
    """A worker started with ``model`` as its default and nothing else from the tests' environment, run until it exits."""
    env = {"PATH": "/usr/bin:/bin", "IMBEDDINGS_REDIS_URL": redis_url, "IMBEDDINGS_SUPPORTED_MODELS_FILE": str(allow_list), "IMBEDDINGS_DEFAULT_MODEL": model}
    return subprocess.run([sys.executable, "-m", "worker"], cwd=REPO_ROOT, env={**env, **extra}, capture_output=True, text=True, timeout=timeout_s)


def test_worker_process_refuses_a_distilled_model(tiny_models: dict[str, Path], allow_list: Path, redis_server) -> None:
    model = str(tiny_models["deit-distilled-tiny"])
    result = _worker_exit(redis_server.url, allow_list, model, 120, HF_HUB_OFFLINE="1")
    assert result.returncode != 0
    assert "refused" in result.stderr and model in result.stderr and "18 tokens" in result.stderr


def test_worker_refuses_models_outside_the_allow_list(allow_list: Path, redis_server, tiny_models: dict[str, Path]) -> None:
    result = _worker_exit(redis_server.url, allow_list, str(tiny_models["dinov2-tiny"]), 60, IMBEDDINGS_WORKER_MODELS="someone/unlisted")
    assert result.returncode != 0 and "someone/unlisted" in result.stderr and "allow-list" in result.stderr


def test_worker_process_names_a_missing_model_directory(tmp_path: Path, redis_server) -> None:
    missing = str(tmp_path / "models" / "dinov2-smal")
    allow_list = tmp_path / "allow.txt"
    allow_list.write_text(missing + "\n")
    result = _worker_exit(redis_server.url, allow_list, missing, 120, HF_HUB_OFFLINE="1")
    assert result.returncode != 0
    assert f"model directory '{missing}' not found" in result.stderr and "Repo id" not in result.stderr
