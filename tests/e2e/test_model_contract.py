"""The token contract, checked when a worker loads a model; pooler_output is never used."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from shared.settings import REPO_ROOT

CPU = torch.device("cpu")


def test_worker_process_refuses_a_distilled_model(tiny_models: dict[str, Path], allow_list: Path, redis_server) -> None:
    model = str(tiny_models["deit-distilled-tiny"])
    env = {
        "PATH": "/usr/bin:/bin",
        "IMBEDDINGS_REDIS_URL": redis_server.url,
        "IMBEDDINGS_SUPPORTED_MODELS_FILE": str(allow_list),
        "IMBEDDINGS_DEFAULT_MODEL": model,
        "HF_HUB_OFFLINE": "1",
    }
    result = subprocess.run([sys.executable, "-m", "worker"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "refused" in result.stderr and model in result.stderr and "18 tokens" in result.stderr


def test_worker_refuses_models_outside_the_allow_list(allow_list: Path, redis_server, tiny_models: dict[str, Path]) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "IMBEDDINGS_REDIS_URL": redis_server.url,
        "IMBEDDINGS_SUPPORTED_MODELS_FILE": str(allow_list),
        "IMBEDDINGS_DEFAULT_MODEL": str(tiny_models["dinov2-tiny"]),
        "IMBEDDINGS_WORKER_MODELS": "someone/unlisted",
    }
    result = subprocess.run([sys.executable, "-m", "worker"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "someone/unlisted" in result.stderr and "allow-list" in result.stderr


def test_worker_process_names_a_missing_model_directory(tmp_path: Path, redis_server) -> None:
    missing = str(tmp_path / "models" / "dinov2-smal")
    allow_list = tmp_path / "allow.txt"
    allow_list.write_text(missing + "\n")
    env = {
        "PATH": "/usr/bin:/bin",
        "IMBEDDINGS_REDIS_URL": redis_server.url,
        "IMBEDDINGS_SUPPORTED_MODELS_FILE": str(allow_list),
        "IMBEDDINGS_DEFAULT_MODEL": missing,
        "HF_HUB_OFFLINE": "1",
    }
    result = subprocess.run([sys.executable, "-m", "worker"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"model directory '{missing}' not found" in result.stderr and "Repo id" not in result.stderr
