"""The backfill command-line client against the real service: output, failures, resuming."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from backfill.output import EMBEDDED, FAILED, PENDING
from shared.settings import REPO_ROOT
from tests.conftest import ImageServer, Service, data_uri
from tests.photos import EXAMPLES


def _manifest(tmp_path: Path, image_server: ImageServer, copies: int) -> tuple[Path, list[str]]:
    local = tmp_path / "photos"
    shutil.copytree(EXAMPLES, local)
    lines = []
    for _ in range(copies):
        lines += [str(local / "cmp1.jpg"), "photos/cmp3.png", image_server.url("cmp2.jpg"), data_uri((EXAMPLES / "img.webp").read_bytes(), "image/webp")]
    lines[5] = str(local / "missing.jpg")  # unreadable file
    lines[6] = image_server.url("no-such-image.jpg")  # server answers 404
    manifest = tmp_path / "manifest.txt"
    manifest.write_text("# a comment line\n" + "\n".join(lines) + "\n")
    return manifest, lines


def _run(service: Service, manifest: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "backfill", str(manifest), "--out", str(out), "--api", service.base_url, "--poll", "0.2", *extra]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_backfill_writes_vectors_in_manifest_order(service: Service, image_server: ImageServer, tmp_path: Path) -> None:
    manifest, lines = _manifest(tmp_path, image_server, copies=6)
    out = tmp_path / "out"
    result = _run(service, manifest, out, "--chunk-items", "5", "--parallel-jobs", "3")
    assert result.returncode == 1, result.stderr  # two rows failed, so the exit code says so
    assert "22 embedded, 2 failed" in result.stderr
    status = np.load(out / "status.npy")
    cls, mean = np.load(out / "cls.npy"), np.load(out / "mean.npy")
    assert cls.shape == (24, 32) and mean.shape == (24, 32) and cls.dtype == np.float32
    assert list(np.flatnonzero(status == FAILED)) == [5, 6]
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert {e["row"] for e in errors} == {5, 6} and any("404" in e["error"]["message"] for e in errors)
    with service.client() as client:
        reference = client.post("/v1/embeddings", json={"input": [data_uri((EXAMPLES / name).read_bytes()) for name in ("cmp1.jpg", "cmp3.png", "cmp2.jpg", "img.webp")]}).json()["data"]
    for row in range(24):
        if status[row] == EMBEDDED:
            assert np.allclose(cls[row], reference[row % 4]["embeddings"]["cls"], atol=1e-6)
            assert np.allclose(mean[row], reference[row % 4]["embeddings"]["mean"], atol=1e-6)
    # A second run finds everything done and sends nothing.
    again = _run(service, manifest, out)
    assert "sent 0 images" in again.stderr


def test_backfill_resumes_after_interruption(service: Service, image_server: ImageServer, tmp_path: Path) -> None:
    manifest, _ = _manifest(tmp_path, image_server, copies=20)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "backfill", str(manifest), "--out", str(out), "--api", service.base_url, "--poll", "0.1", "--chunk-items", "4", "--parallel-jobs", "1"]
    # Ctrl-C as a user at a terminal sends it. A suite started in the background by a shell runs with
    # SIGINT ignored, which children inherit (and Python then never raises KeyboardInterrupt).
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    status_path = out / "status.npy"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if status_path.exists() and np.count_nonzero(np.load(status_path) != PENDING) >= 12:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert "interrupted" in stderr
    finished_before = np.load(status_path) != PENDING
    assert 12 <= finished_before.sum() < 80
    cls_before = np.load(out / "cls.npy")[finished_before].copy()

    resumed = _run(service, manifest, out, "--chunk-items", "4", "--parallel-jobs", "2")
    status = np.load(status_path)
    assert not (status == PENDING).any(), resumed.stderr
    sent = int(resumed.stderr.split("sent ")[1].split(" images")[0])
    # Only what was not finished goes out again (plus at most the chunk that was in flight).
    assert sent <= 80 - finished_before.sum() and sent >= 80 - finished_before.sum() - 4
    assert np.array_equal(np.load(out / "cls.npy")[finished_before], cls_before)
