"""A small keep-alive HTTP/1.1 load generator on asyncio streams.

Request bodies are built once; each client only writes bytes and reads a Content-Length body, so the
load generator takes little of the CPU it shares with the service on a small machine.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    latencies_s: list[float] = field(default_factory=list)
    errors: dict[int, int] = field(default_factory=dict)
    wall_s: float = 0.0


async def _request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes) -> int:
    writer.write(raw)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = next(int(line.split(":", 1)[1]) for line in lines[1:] if line.lower().startswith("content-length:"))
    await reader.readexactly(length)
    return status


def build_request(host: str, port: int, path: str, body: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


async def run_load(host: str, port: int, requests: list[bytes], clients: int, total: int, on_progress=None) -> LoadResult:
    """Send ``total`` requests over ``clients`` connections, cycling through ``requests``."""
    result = LoadResult()
    counter = iter(range(total))
    done = 0

    async def client() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for n in counter:
                started = time.perf_counter()
                status = await _request(reader, writer, requests[n % len(requests)])
                result.latencies_s.append(time.perf_counter() - started)
                if status != 200:
                    result.errors[status] = result.errors.get(status, 0) + 1
                done += 1
                if on_progress is not None:
                    on_progress(done)
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    result.wall_s = time.perf_counter() - started
    return result


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]
