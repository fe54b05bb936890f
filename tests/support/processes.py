"""What a running process says about itself in its JSON log lines (the CPU time and memory /proc counts
for it: ``devtools.processes``)."""

from __future__ import annotations

import json

from devtools.processes import ServiceProcess


def log_lines(process: ServiceProcess) -> list[dict]:
    # Only finished lines: the process may be half-way through writing the last one.
    return [json.loads(line) for line in process.log_text().split("\n")[:-1] if line.startswith("{")]


def ready_line(worker: ServiceProcess) -> dict | None:
    """The worker's "worker ready" log line (its Celery node, CPUs, threads, metrics port), once written."""
    return next((line for line in log_lines(worker) if line.get("message") == "worker ready"), None)
