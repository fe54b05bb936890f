"""Start and stop the service's processes (``python -m api`` / ``python -m worker``) from Python, and read
what /proc counts for a process: CPU time, memory, children. Tests and benchmarks both use these."""

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

_TICKS = os.sysconf("SC_CLK_TCK")  # what /proc/<pid>/stat counts CPU time in


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


def cpu_seconds(pid: int, reaped: bool = False) -> float:
    """User and system CPU seconds of a live process; with ``reaped``, also those of the children it has waited for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if reaped else 0)
    return ticks / _TICKS


def machine_cpu_seconds() -> tuple[float, float]:
    """CPU seconds the whole machine has been busy (all processes, interrupts) and had stolen by its hypervisor, from /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(field) for field in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    return (user + nice + system + irq + softirq) / _TICKS, steal / _TICKS


def children(pid: int) -> list[int]:
    """The live children of every thread of ``pid`` (a thread that exits while they are read has none)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its live children (a worker's decode processes); a child that exits meanwhile counts for nothing."""
    total = cpu_seconds(pid)
    for child in children(pid):
        try:
            total += cpu_seconds(child)
        except FileNotFoundError:
            pass
    return total


def status_kb(pid: int, field: str) -> int:
    """A size from /proc/<pid>/status, in kB: ``VmRSS`` now, ``VmHWM`` its peak."""
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])


def rss_mb(pid: int) -> float:
    return status_kb(pid, "VmRSS") / 1024


def reset_peak_rss(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := current RSS
