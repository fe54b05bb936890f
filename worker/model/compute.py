"""Which threads of a worker may run torch on all of its CPUs: exactly one.

PyTorch's CPU kernels run on OpenMP (libgomp on Linux), which gives every thread that starts a
parallel op a team of helper threads of its own. Once a process holds more OpenMP threads than
there are CPUs, libgomp stops letting idle helpers spin and parks them instead, so each of the
hundreds of small ops in a forward pass pays a wake-up (the README's "Throughput" section has the
cost measured). So models are loaded and run on one compute thread, and the threads that decode and
preprocess images run torch single-threaded: they get their parallelism from each other, and leave
the cores to the model.
"""

from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


def compute_executor() -> ThreadPoolExecutor:
    """The one thread that loads, checks and runs this process's models."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")


def use_one_torch_thread() -> None:
    """Thread-pool initializer: torch ops on the calling thread stay on it (no OpenMP team)."""
    # torch sets each thread's OpenMP thread count once, lazily, from its global setting; trigger
    # that first so it cannot undo the setting below.
    torch.get_num_threads()
    openmp = _loaded_openmp()
    if openmp is not None:
        openmp.omp_set_num_threads(1)  # per thread in OpenMP: other threads keep theirs


def _loaded_openmp() -> ctypes.CDLL | None:
    # torch's wheels bundle their own libgomp (libgomp-<hash>.so.1): set the one torch really uses.
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux: torch's OpenMP (if any) is not libgomp and has no such throttling
        return None
    for line in maps.splitlines():
        path = line.split()[-1]
        if Path(path).name.startswith(("libgomp", "libiomp")) and ".so" in path:
            return ctypes.CDLL(path)
    return None


def configure_torch(threads: int, device: torch.device, cuda_memory_fraction: float | None) -> None:
    """Process-wide torch settings, before any model loads: its thread count, and its share of the GPU."""
    torch.set_num_threads(threads)
    if device.type == "cuda" and cuda_memory_fraction is not None:
        # A cap for this process, so several workers (or other programs) can share one GPU.
        torch.cuda.set_per_process_memory_fraction(cuda_memory_fraction, device)
