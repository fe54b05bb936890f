"""How many threads a worker runs, from the CPUs it may use rather than the CPUs the host has.

Several workers on one host is the normal layout. A worker that sized its pools from the whole
machine would start one OpenMP thread per core of the host for its forward pass, and so would
every other worker there: more spinning threads than cores, all of them slowed down. So the
budget follows the worker's CPU affinity (``IMBEDDINGS_WORKER_CPUS``, ``taskset``, a container's
cpuset), which is how a host is split between workers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from shared.settings import Settings

# Downloads wait on the network, not on a CPU: their number does not follow the CPU budget.
FETCH_THREADS = 16


@dataclass(frozen=True)
class ThreadBudget:
    cpus: int
    torch_threads: int
    preprocess_threads: int
    fetch_threads: int

    @classmethod
    def for_cpus(cls, cpus: int, device_type: str, settings: Settings, omp_num_threads: str | None = None) -> ThreadBudget:
        """The budget of a worker that may use ``cpus`` CPUs and runs its models on ``device_type``.

        ``omp_num_threads`` is the OMP_NUM_THREADS environment variable: torch has always honoured
        it, so an operator who set it keeps what they asked for unless IMBEDDINGS_TORCH_THREADS says
        otherwise.
        """
        torch_threads = settings.torch_threads or _positive_int(omp_num_threads) or cpus
        if settings.preprocess_threads:
            preprocess_threads = settings.preprocess_threads
        elif device_type == "cuda":
            # The GPU runs the model: the CPUs are there to decode and preprocess for it.
            preprocess_threads = cpus
        else:
            # The forward pass needs most of the cores and decoding costs a fraction of it per
            # image; at least two, so one large image does not hold up the next batch alone.
            preprocess_threads = min(cpus, max(2, cpus // 4))
        return cls(cpus=cpus, torch_threads=torch_threads, preprocess_threads=preprocess_threads, fetch_threads=FETCH_THREADS)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _positive_int(value: str | None) -> int | None:
    # OMP_NUM_THREADS may list one count per nesting level ("4,2"); the first is the outer team.
    try:
        number = int((value or "").split(",")[0])
    except ValueError:
        return None
    return number if number >= 1 else None
