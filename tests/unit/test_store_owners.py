"""Each Redis key family of jobs, tenants' quotas, files and batches is named by one module, and the
job and quota scripts are registered only by their owners (the README's table of owners)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(path for folder in ("api", "worker", "shared", "backfill", "bench", "devtools") for path in (ROOT / folder).rglob("*.py"))
# A key name is the configured prefix, then the family: f"{self.prefix}job:{job_id}", f"{state.settings.redis_key_prefix}file:{...}".
KEY_NAME = re.compile(r"prefix\}(?P<family>job-counts|job|tenant|file|batches|batch)\b")
OWNERS = {
    "job": "shared/store/jobs.py",
    "job-counts": "shared/store/jobs.py",
    "tenant": "shared/store/tenants.py",
    "file": "api/files.py",
    "batch": "api/batches.py",
    "batches": "api/batches.py",
}
SCRIPTS = {
    "shared.store.jobs": ("CREATE", "STORE_RESULTS", "MARK_RUNNING", "CANCEL", "DISCARD"),
    "shared.store.tenants": ("QUOTA_FUNCTIONS", "ADMIT", "RELEASE"),
}


def _named_by() -> dict[str, set[str]]:
    named: dict[str, set[str]] = {family: set() for family in OWNERS}
    for path in SOURCES:
        for match in KEY_NAME.finditer(path.read_text()):
            named[match["family"]].add(path.relative_to(ROOT).as_posix())
    return named


@pytest.mark.parametrize("family", sorted(OWNERS))
def test_each_key_family_is_named_by_its_owner_alone(family: str) -> None:
    assert _named_by()[family] == {OWNERS[family]}


def test_only_the_stores_hold_the_job_and_quota_scripts() -> None:
    importers = set()
    for path in SOURCES:
        for module, names in SCRIPTS.items():
            for line in re.findall(rf"^from {re.escape(module)} import (.+)$", path.read_text(), re.MULTILINE):
                if set(names) & {name.strip() for name in line.split(",")}:
                    importers.add((path.relative_to(ROOT).as_posix(), module))
    # The job scripts and the synchronous admission script account for the owner's quota with the quota module's Lua functions.
    assert importers == {("shared/store/jobs.py", "shared.store.tenants"), ("shared/store/admission.py", "shared.store.tenants")}
