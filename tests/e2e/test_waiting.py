"""Waiting with the default settings: long waits are answered, a client that leaves takes its
request with it, and an oversize body gets a 413 the client can read."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
import redis

from devtools.processes import wait_until
from shared.store.admission import LedgerKeys
from tests.support.images import serve_photos
from tests.support.sockets import address
from tests.support.stack import Stack

MiB = 2**20


def _api_lines(service: Stack) -> list[dict]:
    return [json.loads(line) for line in service.api.log_text().split("\n")[:-1] if line.startswith("{")]


def test_service_under_test_runs_the_default_timeout_and_body_limit(service: Stack) -> None:
    with service.client() as client:
        settings = client.get("/info").json()["settings"]
    assert (settings["request_timeout_s"], settings["max_request_bytes"]) == (60.0, 64 * MiB)


def test_a_wait_longer_than_five_seconds_is_answered(service: Stack) -> None:
    """redis-py's default 5 s socket timeout once cut every such wait into a 503."""
    with serve_photos(delay_s=7) as slow, service.client(timeout=90) as client:
        started = time.monotonic()
        answer = client.post("/v1/embeddings", json={"input": f"{slow}/cmp1.jpg"})
        waited = time.monotonic() - started
    assert answer.status_code == 200, answer.text
    assert waited > 6.5
    print(f"answered after {waited:.1f} s")


def test_a_client_that_hangs_up_withdraws_its_request(service: Stack) -> None:
    store = redis.Redis.from_url(service.env["IMBEDDINGS_REDIS_URL"])
    keys = LedgerKeys("imb:")
    model = service.model("dinov2-tiny")
    with serve_photos(delay_s=6) as slow:
        with httpx.Client(base_url=service.base_url, timeout=1.0) as client, pytest.raises(httpx.ReadTimeout):
            client.post("/v1/embeddings", json={"input": [f"{slow}/cmp1.jpg", f"{slow}/cmp2.jpg"]}, headers={"X-Request-ID": "hangs-up-7"})
        gave_up = time.monotonic()

        def withdrawn() -> bool:
            return any(line.get("request_id") == "hangs-up-7" and line.get("status") == 499 for line in _api_lines(service))

        wait_until(withdrawn, 10, what="the API to log the withdrawn request")
        print(f"withdrawn {time.monotonic() - gave_up:.2f} s after the client hung up")
        # Its place in the admission ledger is given back, and the worker is told to skip it.
        assert store.zcard(keys.admitted(model)) == 0
        assert int(store.hget(keys.admitted_images(model), "total") or 0) == 0
        assert store.keys("imb:abandoned:*")


def _send_then_read(base_url: str, head: bytes, body: Iterator[bytes]) -> bytes:
    """A client that sends the whole request before reading the answer, as most HTTP clients do
    (httpx is an exception: it reads an answer even after its upload failed)."""
    with socket.create_connection(address(base_url), timeout=30) as sock:
        sock.sendall(head)
        for piece in body:
            sock.sendall(piece)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_an_oversize_body_gets_a_readable_413(service: Stack, declared: bool) -> None:
    """A 65 MiB body against the default 64 MiB limit."""
    pieces = [b'{"input": "', *[b"A" * MiB] * 65, b'"}']
    if declared:
        head = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % sum(map(len, pieces))
        body = iter(pieces)
    else:
        head = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        body = iter([*(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces), b"0\r\n\r\n"])
    answer = _send_then_read(service.base_url, head, body)
    head_part, _, payload = answer.partition(b"\r\n\r\n")
    assert head_part.startswith(b"HTTP/1.1 413"), answer[:200]
    error = json.loads(payload)["error"]
    assert error["code"] == "request_too_large" and str(64 * MiB) in error["message"]


def test_an_oversize_declared_body_is_answered_before_it_is_sent(service: Stack) -> None:
    with socket.create_connection(address(service.base_url), timeout=5) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 999999999\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")
