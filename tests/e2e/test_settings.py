"""Bad settings stop the API and worker processes at start, naming the variable."""

from __future__ import annotations

import subprocess
import sys

import pytest

from shared.settings import REPO_ROOT


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("IMBEDDINGS_PORT", "-1"),
        ("IMBEDDINGS_API_KEYS", " , "),
        ("IMBEDDINGS_API_KEYS", ""),
        # kombu used to stop the worker with a TypeError on this URL, after the models had loaded.
        ("IMBEDDINGS_REDIS_URL", "redis://127.0.0.1:6379/0?password=hunter2"),
    ],
)
def test_processes_refuse_to_start_with_bad_settings(name: str, value: str) -> None:
    for module in ("api", "worker"):
        result = subprocess.run(
            [sys.executable, "-m", module], cwd=REPO_ROOT, env={name: value, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Invalid Imbeddings configuration" in result.stderr and name in result.stderr
        assert "TypeError" not in result.stderr and "hunter2" not in result.stderr
