"""How a worker divides its CPUs: CPU lists, the split between a host's workers, and the thread budget."""

from __future__ import annotations

import pytest

from devtools.run_local import split_cpus
from shared.cpus import format_cpu_list, parse_cpu_list
from shared.settings import Settings
from worker.cpu_budget import FETCH_THREADS, ThreadBudget


def _defaults() -> Settings:
    """Settings with the thread counts unset, whatever the environment running the tests says."""
    return Settings(torch_threads=None, preprocess_threads=None)


def test_cpu_split() -> None:
    assert split_cpus(frozenset(range(8)), 2) == [frozenset(range(4)), frozenset(range(4, 8))]
    assert split_cpus(frozenset({0, 1, 2, 8, 9}), 2) == [frozenset({0, 1}), frozenset({2, 8, 9})]
    assert split_cpus(frozenset(range(3)), 3) == [frozenset({0}), frozenset({1}), frozenset({2})]


@pytest.mark.parametrize(
    ("cpus", "device", "torch_threads", "preprocess_threads"),
    [(1, "cpu", 1, 1), (2, "cpu", 2, 2), (8, "cpu", 8, 2), (16, "cpu", 16, 4), (64, "cpu", 64, 16), (1, "cuda", 1, 1), (8, "cuda", 8, 8)],
)
def test_thread_budget_follows_the_cpus(cpus: int, device: str, torch_threads: int, preprocess_threads: int) -> None:
    budget = ThreadBudget.for_cpus(cpus, device, _defaults())
    assert budget == ThreadBudget(cpus=cpus, torch_threads=torch_threads, preprocess_threads=preprocess_threads, fetch_threads=FETCH_THREADS)


def test_thread_budget_honours_explicit_settings() -> None:
    explicit = Settings(torch_threads=3, preprocess_threads=5)
    assert ThreadBudget.for_cpus(8, "cpu", explicit, omp_num_threads="2") == ThreadBudget(
        cpus=8, torch_threads=3, preprocess_threads=5, fetch_threads=FETCH_THREADS
    )
    assert ThreadBudget.for_cpus(8, "cpu", _defaults(), omp_num_threads="2").torch_threads == 2
    assert ThreadBudget.for_cpus(8, "cpu", _defaults(), omp_num_threads="4,2").torch_threads == 4
    for ignored in ("", "0", "many"):
        assert ThreadBudget.for_cpus(8, "cpu", _defaults(), omp_num_threads=ignored).torch_threads == 8


def test_cpu_lists() -> None:
    assert parse_cpu_list(" 0-3, 8,10-11") == frozenset({0, 1, 2, 3, 8, 10, 11})
    assert format_cpu_list(frozenset({11, 0, 1, 2, 3, 8, 10})) == "0-3,8,10-11"
    assert format_cpu_list(frozenset({5})) == "5"
    for bad in ("", "a", "1-", "-1", "3-1", "0,,1", "1.5"):
        with pytest.raises(ValueError):
            parse_cpu_list(bad)
