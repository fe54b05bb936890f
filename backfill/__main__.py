"""``python -m backfill MANIFEST --out DIR``: embed every image of a manifest through the jobs API.

The manifest has one image per line: an http(s) URL, a data URI, or a local file path (read here and
sent as base64); or ``id<TAB>image`` lines, a CSV with ``id`` and ``image`` columns, or JSON lines
with ``id`` and ``image``. Images are submitted as jobs of at most ``--chunk-items`` images /
``--chunk-bytes`` of request body, ``--parallel-jobs`` at a time, to the service at ``--api``. Results
land in DIR (cls.npy, mean.npy, status.npy, errors.jsonl; with ``--format parquet`` also
embeddings.parquet) as each job completes, and the job is then deleted on the server. Run the same
command again after an interruption: finished rows are kept, submitted jobs are picked up where the
server has them, and only what is missing is sent again.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from backfill.manifest import Manifest, ManifestError, as_input
from backfill.output import DTYPES, FAILED, PENDING, Output

RETRYABLE = {429, 502, 503, 504}


class Fatal(Exception):
    pass


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every option's default that is a value."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and action.default not in (None, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


@dataclass
class Chunk:
    rows: list[int]
    job_id: str
    seen: int = 0  # items the server had finished at the last poll


class Api:
    def __init__(self, base_url: str, api_key: str | None, timeout_s: float) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One call, retried with backoff on 429/5xx and connection errors; 4xx are fatal."""
        delay = 1.0
        for _attempt in range(30):
            try:
                response = self._client.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                wait, reason = delay, f"{type(exc).__name__}"
            else:
                if response.status_code < 400 or response.status_code == 404:
                    return response
                if response.status_code not in RETRYABLE:
                    raise Fatal(f"{method} {path}: HTTP {response.status_code}: {_message(response)}")
                wait, reason = float(response.headers.get("Retry-After", delay)), f"HTTP {response.status_code}"
            tqdm.write(f"{method} {path}: {reason}; retrying in {wait:g} s", file=sys.stderr)
            time.sleep(wait)
            delay = min(delay * 2, 30)
        raise Fatal(f"{method} {path}: the service kept failing")

    def results(self, job_id: str) -> list[dict[str, Any]]:
        response = self.request("GET", f"/v1/jobs/{job_id}/results.jsonl")
        if response.status_code == 404:
            raise LookupError(_message(response))
        return [json.loads(line) for line in response.text.splitlines() if line]


def _message(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


def _vector(value: str | list[int], dtype: np.dtype) -> np.ndarray:
    """A float32 vector arrives as base64, a quantised one as a list of integers."""
    return np.frombuffer(base64.b64decode(value), dtype="<f4") if isinstance(value, str) else np.asarray(value, dtype=dtype)


class Backfill:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        try:
            self.manifest = Manifest.read(args.manifest)
        except (OSError, ManifestError) as exc:
            raise Fatal(str(exc)) from None
        self.output = Output(args.out, len(self.manifest.images), args.encoding)
        self.api = Api(args.api, args.api_key, args.timeout)
        self.state = self.output.load_state()
        if self.state and self.state.get("manifest_sha256") != self.manifest.sha256:
            raise Fatal(f"{args.out} was written for another manifest; choose a new --out")
        if self.state and self.state.get("encoding", "float") != args.encoding:
            raise Fatal(
                f"{args.out} holds {self.state.get('encoding', 'float')} vectors;"
                f" resume with --encoding {self.state.get('encoding', 'float')} or choose a new --out"
            )
        self.state.update(manifest_sha256=self.manifest.sha256, model=args.model, encoding=args.encoding)
        self.in_flight = [Chunk(rows, job_id) for job_id, rows in self.state.get("jobs", {}).items()]
        claimed = {row for chunk in self.in_flight for row in chunk.rows}
        self.todo = iter([row for row in range(len(self.manifest.images)) if self.output.status[row] == PENDING and row not in claimed])
        self.sent = 0

    def run(self) -> int:
        done = int(np.count_nonzero(self.output.status != PENDING))
        with tqdm(total=len(self.manifest.images), initial=done, unit="img", dynamic_ncols=True, desc="embedded") as bar:
            self.bar = bar
            while True:
                while len(self.in_flight) < self.args.parallel_jobs and self._submit_next():
                    pass
                if not self.in_flight:
                    break
                self._poll()
                time.sleep(self.args.poll)
        failed = int(np.count_nonzero(self.output.status == FAILED))
        if self.args.format == "parquet":
            print(f"wrote {self.output.write_parquet(self.manifest.ids)}", file=sys.stderr)
        print(
            f"done: {len(self.manifest.images) - failed} embedded, {failed} failed (see {self.args.out / 'errors.jsonl'}); sent {self.sent} images this run",
            file=sys.stderr,
        )
        return 1 if failed else 0

    def _submit_next(self) -> bool:
        rows, inputs, size = [], [], 0
        base = self.manifest.path.parent
        for row in self.todo:
            try:
                value = as_input(self.manifest.images[row], base)
            except OSError as exc:
                self.output.write_error(
                    row, self.manifest.images[row], {"message": f"cannot read file: {exc.strerror}", "type": "invalid_request_error", "code": "file_unreadable"}
                )
                self.bar.update(1)
                continue
            rows.append(row)
            inputs.append(value)
            size += len(value) + 4
            if len(rows) >= self.args.chunk_items or size >= self.args.chunk_bytes:
                break
        if not rows:
            return False
        body: dict[str, Any] = {"input": inputs, "encoding_format": "base64" if self.args.encoding == "float" else self.args.encoding}
        if self.args.model:
            body["model"] = self.args.model
        job = self.api.request("POST", "/v1/jobs", json=body).json()
        self.sent += len(rows)
        self.in_flight.append(Chunk(rows, job["id"]))
        self._save()
        return True

    def _poll(self) -> None:
        for chunk in list(self.in_flight):
            response = self.api.request("GET", f"/v1/jobs/{chunk.job_id}")
            if response.status_code == 404:
                tqdm.write(f"job {chunk.job_id}: {_message(response)}; its {len(chunk.rows)} images will be sent again", file=sys.stderr)
                self._requeue(chunk)
                continue
            job = response.json()
            finished = job["completed"] + job["failed"]
            self.bar.update(finished - chunk.seen)
            chunk.seen = finished
            if job["status"] == "completed":
                self._collect(chunk)
            elif job["status"] == "cancelled":
                tqdm.write(f"job {chunk.job_id} was cancelled on the server; its images will be sent again", file=sys.stderr)
                self._requeue(chunk)

    def _collect(self, chunk: Chunk) -> None:
        try:
            items = self.api.results(chunk.job_id)
        except LookupError as exc:
            tqdm.write(f"job {chunk.job_id}: {exc}; its images will be sent again", file=sys.stderr)
            self._requeue(chunk)
            return
        dtype = np.dtype(DTYPES[self.args.encoding])
        for item in items:
            row = chunk.rows[item["index"]]
            if "error" in item:
                self.output.write_error(row, self.manifest.images[row], item["error"])
            else:
                self.output.write_vectors(row, _vector(item["embeddings"]["cls"], dtype), _vector(item["embeddings"]["mean"], dtype))
        self.in_flight.remove(chunk)
        self._save()
        # On disk now: the server need not keep the results for the rest of their TTL.
        self.api.request("DELETE", f"/v1/jobs/{chunk.job_id}")

    def _requeue(self, chunk: Chunk) -> None:
        self.bar.update(-chunk.seen)
        self.in_flight.remove(chunk)
        self.todo = iter([*chunk.rows, *self.todo])
        self._save()

    def _save(self) -> None:
        self.state["jobs"] = {chunk.job_id: chunk.rows for chunk in self.in_flight}
        self.output.save_state(self.state)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m backfill", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("manifest", type=Path, help="the images: a text file (one per line, or id<TAB>image), .csv or .jsonl with id and image")
    parser.add_argument("--out", type=Path, required=True, help="output directory (created; reused to resume)")
    parser.add_argument(
        "--api", default=os.environ.get("IMBEDDINGS_API", "http://127.0.0.1:8000"), help="the service's base URL; IMBEDDINGS_API sets the default"
    )
    parser.add_argument("--api-key", help="sent as Authorization: Bearer (default: IMBEDDINGS_API_KEY, never shown here)")
    parser.add_argument("--model", default=None, help="model id (default: the service's default model)")
    parser.add_argument(
        "--encoding",
        choices=list(DTYPES),
        default="float",
        help="how vectors are stored: float32, int8/uint8 (round(127 x)), binary/ubinary (sign bits, 8 per byte)",
    )
    parser.add_argument(
        "--format", choices=["npy", "parquet"], default="npy", help="parquet: also write embeddings.parquet (id, cls, mean) once no row is pending"
    )
    parser.add_argument("--chunk-items", type=int, default=1000, help="images per job")
    parser.add_argument("--chunk-bytes", type=int, default=32 * 2**20, help="request body budget per job, in bytes")
    parser.add_argument("--parallel-jobs", type=int, default=4, help="jobs in flight at once")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between progress polls")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one HTTP call may take")
    args = parser.parse_args()
    args.api_key = args.api_key or os.environ.get("IMBEDDINGS_API_KEY")
    try:
        sys.exit(Backfill(args).run())
    except Fatal as exc:
        sys.exit(f"backfill: {exc}")
    except KeyboardInterrupt:
        sys.exit("backfill: interrupted; run the same command again to resume")


if __name__ == "__main__":
    main()
