"""``python -m bench.job_submit``: what submitting one large job of data URIs costs the API process.

Starts a private Redis and the API alone (no worker: a job is accepted whether or not a worker serves
its model, and what is measured happens before any worker is involved), then sends one job of
``--images`` data URIs (the bench photos as JPEGs of ``--side`` px, cycled) over a socket, generating
the body as it goes so the client holds none of it. Printed per run: the API's RSS before, its peak
during the submission (``VmHWM``), what it keeps a few seconds after answering, its CPU seconds, the
submission's wall time and status, and Redis's ``used_memory`` after.

The body limits are raised to let the body in (``IMBEDDINGS_MAX_REQUEST_BYTES``,
``IMBEDDINGS_MAX_BUFFERED_BYTES``, ``IMBEDDINGS_BODY_TIMEOUT_S``); everything else is the default.

``--root NAME=DIR`` (repeatable) starts the API from another checkout (say, the base commit, unpacked
with ``git archive``), so two versions are measured alternately in one session: A B A B ...
``--runs`` times, each on a fresh Redis and API; the table gives each version's medians and the ratio.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from bench.photos import bench_jpegs
from devtools.processes import ServiceProcess, cpu_seconds, reset_peak_rss, rss_mb, status_kb, wait_until
from devtools.redis_server import RedisServer, free_port
from shared.settings import REPO_ROOT

SEND_BYTES = 2**20
# The API's RSS is read this long after its answer: what it keeps, not what it is still freeing.
SETTLE_S = 3.0
MEASURES = ("peak_rss_mb", "kept_rss_mb", "submit_s", "api_cpu_s")


def _body_parts(uris: list[bytes], images: int) -> tuple[int, Iterator[bytes]]:
    """The body's length, and its bytes in pieces of about ``SEND_BYTES``."""
    head, tail = b'{"encoding_format": "base64", "input": [', b"]}"
    length = len(head) + len(tail) + sum(len(uris[i % len(uris)]) for i in range(images)) + 2 * images + (images - 1)

    def parts() -> Iterator[bytes]:
        piece = bytearray(head)
        for i in range(images):
            piece += b'"' + uris[i % len(uris)] + (b'",' if i < images - 1 else b'"')
            if len(piece) >= SEND_BYTES:
                yield bytes(piece)
                piece.clear()
        yield bytes(piece + tail)

    return length, parts()


def _post(port: int, length: int, parts: Iterator[bytes]) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=600) as sock:
        head = f"POST /v1/jobs HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
        sock.sendall(head.encode())
        for part in parts:
            sock.sendall(part)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    return status, answer.partition(b"\r\n\r\n")[2]


def measure(name: str, root: Path, uris: list[bytes], images: int, workdir: Path) -> dict[str, object]:
    length, parts = _body_parts(uris, images)
    store = RedisServer(workdir / "redis").start()
    port = free_port()
    env = {
        "IMBEDDINGS_REDIS_URL": store.url,
        "IMBEDDINGS_PORT": str(port),
        "IMBEDDINGS_SUPPORTED_MODELS_FILE": str(workdir / "models.txt"),
        "IMBEDDINGS_DEFAULT_MODEL": "bench/unserved",
        "IMBEDDINGS_MAX_REQUEST_BYTES": str(length + SEND_BYTES),
        "IMBEDDINGS_MAX_BUFFERED_BYTES": str(length + SEND_BYTES),
        "IMBEDDINGS_BODY_TIMEOUT_S": "600",
    }
    (workdir / "models.txt").write_text("bench/unserved\n")
    api = ServiceProcess("api", env, workdir / f"api-{name}.log", launcher=["env", "-C", str(root)]).start()
    try:
        wait_until(lambda: _healthy(port), 60, interval_s=0.2, what="the API to answer")
        warm_length, warm_parts = _body_parts(uris, 100)
        warm_status, warm_body = _post(port, warm_length, warm_parts)
        if warm_status != 202:
            raise RuntimeError(f"{name}: warm-up job answered {warm_status}: {warm_body[:300]!r}")
        time.sleep(1)
        start_rss = rss_mb(api.pid)
        reset_peak_rss(api.pid)
        cpu_before = cpu_seconds(api.pid)
        started = time.perf_counter()
        status, answer = _post(port, length, parts)
        submit_s = time.perf_counter() - started
        cpu = cpu_seconds(api.pid) - cpu_before
        peak = status_kb(api.pid, "VmHWM") / 1024
        time.sleep(SETTLE_S)
        kept = rss_mb(api.pid)
        used = int(redis.Redis.from_url(store.url).info("memory")["used_memory"])
        job = json.loads(answer) if status == 202 else {"error": answer[:300].decode(errors="replace")}
        return {
            "version": name,
            "images": images,
            "body_mb": round(length / 2**20, 1),
            "status": status,
            "total": job.get("total"),
            "submit_s": round(submit_s, 2),
            "api_cpu_s": round(cpu, 2),
            "start_rss_mb": round(start_rss, 1),
            "peak_rss_mb": round(peak, 1),
            "kept_rss_mb": round(kept, 1),
            "redis_used_mb": round(used / 2**20, 1),
            "load_avg_1m": os.getloadavg()[0],
        }
    finally:
        api.stop()
        store.stop(graceful=False)


def _healthy(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--side", type=int, default=256, help="longest side of the JPEGs (256: 16 kB on average)")
    parser.add_argument("--root", action="append", default=[], help="NAME=DIR: a checkout to start the API from (repeatable); default: this one")
    parser.add_argument("--runs", type=int, default=2, help="rounds; each round measures every root once, in order")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()

    roots = [(name, Path(path).resolve()) for name, _, path in (item.partition("=") for item in args.root)] or [("this", REPO_ROOT)]
    uris = [b"data:image/jpeg;base64," + base64.b64encode(data) for data in bench_jpegs(args.side).values()]
    rows = []
    for _ in range(args.runs):
        for name, root in roots:
            with tempfile.TemporaryDirectory(prefix="imbeddings-job-submit-") as tmp:
                row = measure(name, root, uris, args.images, Path(tmp))
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.json:
        args.json.write_text("".join(json.dumps(row) + "\n" for row in rows))
    medians = {name: {key: statistics.median(float(row[key]) for row in rows if row["version"] == name) for key in MEASURES} for name, _ in roots}
    print(f"\n{'version':10} " + " ".join(f"{key:>12}" for key in MEASURES) + "   (medians)")
    for name, values in medians.items():
        print(f"{name:10} " + " ".join(f"{values[key]:12.2f}" for key in MEASURES))
    if len(roots) == 2:
        (first, a), (second, b) = medians.items()
        print(f"{second}/{first} " + " ".join(f"{b[key] / a[key] if a[key] else float('nan'):12.3f}" for key in MEASURES))


if __name__ == "__main__":
    main()
