"""CPU sets in the Linux CPU-list notation (``0-3,8``), as taskset, cpusets and /proc use it."""

from __future__ import annotations

import os


def parse_cpu_list(text: str) -> frozenset[int]:
    """``"0-3,8"`` -> ``{0, 1, 2, 3, 8}``; raises ValueError saying what is wrong."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        first, dash, last = part.partition("-")
        if not first.strip().isdigit() or (dash and not last.strip().isdigit()):
            raise ValueError(f"{part!r} is not a CPU number or range; expected a CPU list such as 0-3,8")
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise ValueError(f"{part!r} is a range that ends before it starts")
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def format_cpu_list(cpus: frozenset[int] | set[int]) -> str:
    """``{0, 1, 2, 3, 8}`` -> ``"0-3,8"``."""
    ranges: list[str] = []
    ordered = sorted(cpus)
    start = 0
    for i in range(1, len(ordered) + 1):
        if i == len(ordered) or ordered[i] != ordered[i - 1] + 1:
            low, high = ordered[start], ordered[i - 1]
            ranges.append(str(low) if low == high else f"{low}-{high}")
            start = i
    return ",".join(ranges)


def available_cpus() -> frozenset[int]:
    """The CPUs this process may run on (its affinity: taskset, a container's cpuset, ...)."""
    if hasattr(os, "sched_getaffinity"):
        return frozenset(os.sched_getaffinity(0))
    # No affinity API (not Linux): every CPU counts.
    return frozenset(range(os.cpu_count() or 1))
