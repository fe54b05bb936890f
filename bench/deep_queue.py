"""Load deeper than the model, against a running stack with its default limits: many clients,
multi-image requests, one request larger than a batch, clients that give up, and one-image requests
while a large job runs. Each scenario prints its answers by status; nothing here asserts.
"""

from __future__ import annotations

import base64
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from bench.load import percentile

# Long enough for every answer the service can give within its own 60 s request timeout.
CLIENT_TIMEOUT_S = 120.0


@dataclass
class Answers:
    statuses: Counter[int | str]
    wall_s: float
    latencies_s: list[float]

    def row(self, name: str) -> dict[str, object]:
        ok = sorted(self.latencies_s)
        return {
            "scenario": name,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items(), key=lambda kv: str(kv[0]))},
            "wall_s": round(self.wall_s, 1),
            "p50_s": round(percentile(ok, 50), 2) if ok else None,
            "p99_s": round(percentile(ok, 99), 2) if ok else None,
        }


def _data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


def _post(base_url: str, body: dict, timeout_s: float) -> tuple[int | str, float]:
    started = time.perf_counter()
    try:
        with httpx.Client(base_url=base_url, timeout=timeout_s) as client:
            status: int | str = client.post("/v1/embeddings", json=body).status_code
    except httpx.TimeoutException:
        status = "gave up"
    return status, time.perf_counter() - started


def _clients(base_url: str, bodies: list[dict], timeout_s: float = CLIENT_TIMEOUT_S) -> Answers:
    """One client per body, all at once."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        answers = list(pool.map(lambda body: _post(base_url, body, timeout_s), bodies))
    wall = time.perf_counter() - started
    return Answers(Counter(status for status, _ in answers), wall, [seconds for status, seconds in answers if status == 200])


def _bodies(jpegs: list[bytes], clients: int, images: int) -> list[dict]:
    uris = [_data_uri(jpeg) for jpeg in jpegs]
    return [{"input": [uris[(c + i) % len(uris)] for i in range(images)], "encoding_format": "base64"} for c in range(clients)]


def _sequential(base_url: str, body: dict, count: int) -> Answers:
    started = time.perf_counter()
    answers = [_post(base_url, body, CLIENT_TIMEOUT_S) for _ in range(count)]
    return Answers(Counter(status for status, _ in answers), time.perf_counter() - started, [s for status, s in answers if status == 200])


def _while_a_job_runs(base_url: str, jpegs: list[bytes], job_images: int, probes: int) -> tuple[Answers, dict[str, object]]:
    """One-image requests, one after another, while a job of ``job_images`` images is embedded."""
    uris = [_data_uri(jpeg) for jpeg in jpegs]
    with httpx.Client(base_url=base_url, timeout=CLIENT_TIMEOUT_S) as client:
        submitted = client.post("/v1/jobs", json={"input": [uris[i % len(uris)] for i in range(job_images)]})
        submitted.raise_for_status()
        job_id = submitted.json()["id"]
        # Measure only once the job's chunks are on the model.
        while client.get(f"/v1/jobs/{job_id}").json()["completed"] == 0:
            time.sleep(0.1)
        answers = _sequential(base_url, {"input": uris[0], "encoding_format": "base64"}, probes)
        state = client.get(f"/v1/jobs/{job_id}").json()
        job = {"job_images": job_images, "job_completed_during_probes": state["completed"], "job_status_after_probes": state["status"]}
        client.delete(f"/v1/jobs/{job_id}")
    return answers, job


def deep_queue_scenarios(base_url: str, jpegs: list[bytes]) -> list[dict[str, object]]:
    """The scenarios, each deeper than the model (a real-shape model on a CPU)."""
    rows = [
        _clients(base_url, _bodies(jpegs, 64, 1)).row("64 clients x 1 image"),
        _clients(base_url, _bodies(jpegs, 16, 4)).row("16 clients x 4 images"),
        _clients(base_url, _bodies(jpegs, 1, 120)).row("1 client x 120 images"),
    ]
    # 48 clients that hang up after 1 s, then one fresh request: it should wait about the batches
    # already on the model, not the whole abandoned backlog.
    abandoning = _clients(base_url, _bodies(jpegs, 48, 1), timeout_s=1.0)
    rows.append(abandoning.row("48 clients giving up after 1 s"))
    rows.append(_sequential(base_url, _bodies(jpegs, 1, 1)[0], 1).row("  the next one-image request"))
    rows.append(_sequential(base_url, _bodies(jpegs, 1, 1)[0], 20).row("1-image requests, idle service"))
    # A job far longer than the probes take (20 probes of about one batch each), yet within one
    # request body: 200 1024-px JPEGs are about 40 MB of data URIs.
    probes = 20
    job_images = 200
    during, job = _while_a_job_runs(base_url, jpegs, job_images, probes)
    rows.append({**during.row("1-image requests while a job runs"), **job})
    return rows


def deep_queue_table(rows: list[dict[str, object]]) -> str:
    lines = ["scenario | answers by status | wall s | p50 s | p99 s", "--- | --- | --- | --- | ---"]
    for row in rows:
        statuses = ", ".join(f"{k}: {v}" for k, v in row["statuses"].items())
        lines.append(f"{row['scenario']} | {statuses} | {row['wall_s']} | {row['p50_s']} | {row['p99_s']}")
    return "\n".join(lines)
