"""What a running process says about itself: its JSON log lines, and the CPU time and memory /proc counts for it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from devtools.processes import ServiceProcess

_TICKS = os.sysconf("SC_CLK_TCK")  # what /proc/<pid>/stat counts CPU time in


def log_lines(process: ServiceProcess) -> list[dict]:
    # Only finished lines: the process may be half-way through writing the last one.
    return [json.loads(line) for line in process.log_text().split("\n")[:-1] if line.startswith("{")]


def ready_line(worker: ServiceProcess) -> dict | None:
    """The worker's "worker ready" log line (its Celery node, CPUs, threads, metrics port), once written."""
    return next((line for line in log_lines(worker) if line.get("message") == "worker ready"), None)


def cpu_seconds(pid: int, reaped: bool = False) -> float:
    """User and system CPU seconds of a live process; with ``reaped``, also those of the children it has waited for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if reaped else 0)
    return ticks / _TICKS


def status_kb(pid: int, field: str) -> int:
    """A size from /proc/<pid>/status, in kB: ``VmRSS`` now, ``VmHWM`` its peak."""
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])


def reset_peak_rss(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := current RSS


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found
