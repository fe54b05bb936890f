"""Start and stop the service's processes (``python -m api`` / ``python -m worker``) from Python."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from shared.settings import REPO_ROOT


class ServiceProcess:
    """A child process running one of the service's modules, in its own process group.

    ``launcher`` prefixes the command: ``ip netns exec NAME`` runs it on another network host (it
    execs the module, so the pid, signals and exit code are the module's own)."""

    def __init__(self, module: str, env: dict[str, str], log_path: Path | None = None, launcher: Sequence[str] = ()) -> None:
        self.module = module
        self.env = env
        self.log_path = log_path
        self.launcher = list(launcher)
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> ServiceProcess:
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [*self.launcher, sys.executable, "-m", self.module],
            cwd=REPO_ROOT,
            env={**os.environ, **self.env},
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT if self._log else None,
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def send(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout_s: float = 30.0) -> int | None:
        """Signal, wait, and kill if it does not go; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.process.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""


def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.1, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
