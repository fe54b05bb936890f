"""The backfill command-line client against the real service: output, failures, resuming."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from backfill.manifest import Manifest, ManifestError
from backfill.output import EMBEDDED, FAILED, PENDING
from devtools.photos import EXAMPLES
from shared.settings import REPO_ROOT
from tests.support.images import ImageServer, data_uri
from tests.support.stack import Stack


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


def _run(service: Stack, manifest: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "backfill", str(manifest), "--out", str(out), "--api", service.base_url, "--poll", "0.2", *extra]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def _job_ids(service: Stack) -> set[str]:
    with redis.Redis.from_url(service.env["IMBEDDINGS_REDIS_URL"]) as client:
        return {key.decode().split(":")[-1] for key in client.scan_iter("imb:job:job_*") if key.count(b":") == 2}


def _reference(service: Stack, **options: object) -> list[dict]:
    """The four manifest photos through /v1/embeddings, as floats unless asked otherwise."""
    with service.client() as client:
        images = [data_uri((EXAMPLES / name).read_bytes()) for name in ("cmp1.jpg", "cmp3.png", "cmp2.jpg", "img.webp")]
        response = client.post("/v1/embeddings", json={"input": images, **options})
    assert response.status_code == 200, response.text
    return response.json()["data"]


def test_backfill_writes_vectors_in_manifest_order(service: Stack, image_server: ImageServer, tmp_path: Path) -> None:
    manifest, lines = _manifest(tmp_path, image_server, copies=6)
    out = tmp_path / "out"
    jobs_before = _job_ids(service)
    result = _run(service, manifest, out, "--chunk-items", "5", "--parallel-jobs", "3")
    assert result.returncode == 1, result.stderr  # two rows failed, so the exit code says so
    assert "22 embedded, 2 failed" in result.stderr
    status = np.load(out / "status.npy")
    cls, mean = np.load(out / "cls.npy"), np.load(out / "mean.npy")
    assert cls.shape == (24, 32) and mean.shape == (24, 32) and cls.dtype == np.float32
    assert list(np.flatnonzero(status == FAILED)) == [5, 6]
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert {e["row"] for e in errors} == {5, 6} and any("404" in e["error"]["message"] for e in errors)
    reference = _reference(service)
    for row in range(24):
        if status[row] == EMBEDDED:
            assert np.allclose(cls[row], reference[row % 4]["embeddings"]["cls"], atol=1e-6)
            assert np.allclose(mean[row], reference[row % 4]["embeddings"]["mean"], atol=1e-6)
    # Each job was deleted once its results were on disk: results gone from Redis, not kept 24 h.
    jobs = _job_ids(service) - jobs_before
    assert len(jobs) == 5
    with redis.Redis.from_url(service.env["IMBEDDINGS_REDIS_URL"]) as client:
        for job_id in jobs:
            assert client.hget(f"imb:job:{job_id}", "results_deleted") == b"1"
            assert not client.exists(f"imb:job:{job_id}:results", f"imb:job:{job_id}:blobs")
    # A second run finds everything done and sends nothing.
    again = _run(service, manifest, out)
    assert "sent 0 images" in again.stderr


def test_backfill_resumes_after_interruption(service: Stack, image_server: ImageServer, tmp_path: Path) -> None:
    manifest, _ = _manifest(tmp_path, image_server, copies=20)
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "backfill",
        str(manifest),
        "--out",
        str(out),
        "--api",
        service.base_url,
        "--poll",
        "0.1",
        "--chunk-items",
        "4",
        "--parallel-jobs",
        "1",
    ]
    # Ctrl-C as a user at a terminal sends it. A suite started in the background by a shell runs with
    # SIGINT ignored, which children inherit (and Python then never raises KeyboardInterrupt).
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)
    )
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

    resumed = _run(service, manifest, out, "--chunk-items", "4", "--parallel-jobs", "2", "--format", "parquet")
    status = np.load(status_path)
    assert not (status == PENDING).any(), resumed.stderr
    # The Parquet file holds every embedded row of both runs, as the .npy files do.
    table = pq.read_table(out / "embeddings.parquet")
    assert table.column("id").to_pylist() == list(np.flatnonzero(status == EMBEDDED))
    assert np.array_equal(np.array(table.column("cls").to_pylist(), dtype=np.float32), np.load(out / "cls.npy")[status == EMBEDDED])
    sent = int(resumed.stderr.split("sent ")[1].split(" images")[0])
    # Only what was not finished goes out again (plus at most the chunk that was in flight).
    assert sent <= 80 - finished_before.sum() and sent >= 80 - finished_before.sum() - 4
    assert np.array_equal(np.load(out / "cls.npy")[finished_before], cls_before)


def _id_manifests(tmp_path: Path, image_server: ImageServer) -> dict[str, tuple[Path, list[str]]]:
    """The same six images, with ids, in each manifest form; row 4's image does not exist."""
    local = tmp_path / "photos"
    shutil.copytree(EXAMPLES, local, dirs_exist_ok=True)
    images = [
        str(local / "cmp1.jpg"),
        "photos/cmp3.png",
        image_server.url("cmp2.jpg"),
        data_uri((EXAMPLES / "img.webp").read_bytes(), "image/webp"),
        image_server.url("gone.jpg"),
        str(local / "cmp1.jpg"),
    ]
    ids = ["sku-001", "sku-002", "a,b \"quoted\"", "sku-004", "sku-005", "7"]
    tsv = tmp_path / "ids.tsv"
    tsv.write_text("# id<TAB>image\n" + "".join(f"{i}\t{image}\n" for i, image in zip(ids, images)))
    csv_path = tmp_path / "ids.csv"
    with open(csv_path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "caption", "id"])
        writer.writerows([image, "ignored", i] for i, image in zip(ids, images))
    jsonl = tmp_path / "ids.jsonl"
    jsonl.write_text("".join(json.dumps({"id": int(i) if i.isdigit() else i, "image": image}) + "\n" for i, image in zip(ids, images)))
    return {"tsv": (tsv, ids), "csv": (csv_path, ids), "jsonl": (jsonl, ids)}


def _vector_type(arrow_type: pa.DataType) -> tuple[str, int]:
    assert pa.types.is_fixed_size_list(arrow_type)
    return str(arrow_type.value_type), arrow_type.list_size


@pytest.mark.parametrize("form", ["tsv", "csv", "jsonl"])
def test_parquet_output_carries_the_manifest_ids(service: Stack, image_server: ImageServer, tmp_path: Path, form: str) -> None:
    manifest, ids = _id_manifests(tmp_path, image_server)[form]
    out = tmp_path / "out"
    result = _run(service, manifest, out, "--format", "parquet", "--chunk-items", "4")
    assert result.returncode == 1 and "5 embedded, 1 failed" in result.stderr, result.stderr
    table = pq.read_table(out / "embeddings.parquet")
    assert _vector_type(table.schema.field("cls").type) == ("float", 32) and str(table.schema.field("id").type) == "string"
    assert table.column("id").to_pylist() == [ids[row] for row in (0, 1, 2, 3, 5)]
    reference = _reference(service)
    cls, mean = np.array(table.column("cls").to_pylist(), dtype=np.float32), np.array(table.column("mean").to_pylist(), dtype=np.float32)
    for position, photo in enumerate((0, 1, 2, 3, 0)):
        assert np.allclose(cls[position], reference[photo]["embeddings"]["cls"], atol=1e-6)
        assert np.allclose(mean[position], reference[photo]["embeddings"]["mean"], atol=1e-6)


@pytest.mark.parametrize("encoding", ["int8", "ubinary"])
def test_parquet_output_in_a_storage_encoding(service: Stack, image_server: ImageServer, tmp_path: Path, encoding: str) -> None:
    manifest, lines = _manifest(tmp_path, image_server, copies=2)
    out = tmp_path / "out"
    result = _run(service, manifest, out, "--format", "parquet", "--encoding", encoding)
    assert "6 embedded, 2 failed" in result.stderr, result.stderr
    table = pq.read_table(out / "embeddings.parquet")
    item_type = {"int8": "int8", "ubinary": "uint8"}[encoding]
    width = {"int8": 32, "ubinary": 4}[encoding]
    assert _vector_type(table.schema.field("mean").type) == (item_type, width)
    assert table.column("id").to_pylist() == [0, 1, 2, 3, 4, 7]  # row numbers when the manifest has no ids
    # The same as the service gives for that encoding, and as the float path quantised.
    reference = _reference(service, encoding_format=encoding)
    floats = _reference(service)
    for row, cls in zip(table.column("id").to_pylist(), table.column("cls").to_pylist()):
        assert cls == reference[row % 4]["embeddings"]["cls"]
        expected = np.asarray(floats[row % 4]["embeddings"]["cls"])
        if encoding == "int8":
            assert np.abs(np.asarray(cls) / 127 - expected).max() <= 0.5 / 127 + 1e-6
        else:
            assert np.array_equal(np.unpackbits(np.asarray(cls, dtype=np.uint8)), expected > 0)
    assert np.load(out / "cls.npy").dtype == np.dtype(item_type)
    # Resuming with another encoding would mix two kinds of vector in one file: refused.
    mixed = _run(service, manifest, out, "--encoding", "float")
    assert mixed.returncode != 0 and f"holds {encoding} vectors" in mixed.stderr


def test_manifest_errors_name_the_line(tmp_path: Path) -> None:
    cases = {
        "mixed.txt": ("a\thttp://x.test/1.jpg\nhttp://x.test/2.jpg\n", "mixed.txt:2: no id<TAB>"),
        "dup.tsv": ("a\thttp://x.test/1.jpg\na\thttp://x.test/2.jpg\n", "dup.tsv:2: id 'a' already used at"),
        "header.csv": ("url,id\nhttp://x.test/1.jpg,a\n", "must name the columns id and image (missing: image"),
        "bad.jsonl": ('{"id": "a", "image": "http://x.test/1.jpg"}\n{"id": true, "image": "x"}\n', "bad.jsonl:2: \"id\" must be"),
        "nojson.jsonl": ("{not json\n", "nojson.jsonl:1: not JSON"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ManifestError, match=None) as error:
            Manifest.read(tmp_path / name)
        assert message in str(error.value), (name, str(error.value))


def test_help_shows_the_defaults_and_the_api_variable() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "backfill", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "IMBEDDINGS_API_KEY": "secret-key-123"},
    )
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "IMBEDDINGS_API sets the default (default: http://127.0.0.1:8000)" in text
    assert "(default: 1000)" in text and "(default: float)" in text and "secret-key-123" not in text
