"""URL fetching in the worker: hosts no resolver takes are item errors, kept-alive connections are
reused only for freshly checked addresses, requests share the fetch threads fairly, and a withdrawn
request stops fetching. Servers are real listeners on 127.0.0.2/127.0.0.3."""

from __future__ import annotations

import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from devtools.image_server import ServedImages, serve_images
from devtools.photos import EXAMPLES
from tests.support.images import LONG_LABEL_HOST, ImageServer
from tests.support.jobs import all_results, submit, wait_done
from tests.support.sockets import accept_each
from tests.support.stack import IMAGE_HOST, Stack
from worker.errors import ImageInputError
from worker.images.connections import ConnectionPool
from worker.images.fetch import Fetcher, FetchLimits, fetch_url
from worker.images.fetch_queue import FetchQueue

OTHER_HOST = "127.0.0.3"
LOCAL = (ipaddress.ip_network(f"{IMAGE_HOST}/32"), ipaddress.ip_network(f"{OTHER_HOST}/32"))
PHOTO = (EXAMPLES / "cmp1.jpg").read_bytes()


def limits(timeout_s: float = 5.0) -> FetchLimits:
    return FetchLimits(timeout_s, 3, 20 * 2**20, LOCAL)


@pytest.fixture
def keep_alive() -> Iterator[ServedImages]:
    with serve_images(EXAMPLES, IMAGE_HOST, keep_alive=True) as served:
        yield served


# --- hosts ---------------------------------------------------------------------------------------


def test_redirect_to_a_host_no_resolver_takes_is_an_invalid_url(keep_alive: ServedImages) -> None:
    with pytest.raises(ImageInputError) as error:
        Fetcher(limits()).fetch(keep_alive.url(f"redirect?to=http://{LONG_LABEL_HOST}/x.png"))
    assert error.value.code == "invalid_url", error.value.message


# --- connection reuse ----------------------------------------------------------------------------


def test_kept_alive_connections_are_reused(keep_alive: ServedImages) -> None:
    fetcher = Fetcher(limits(), ConnectionPool(max_idle=8))
    bodies = [fetcher.fetch(keep_alive.url("cmp1.jpg")) for _ in range(20)]
    assert all(body == PHOTO for body in bodies)
    assert (keep_alive.requests, keep_alive.connections) == (20, 1)
    assert fetcher.connections.idle_count() == 1


def test_a_server_that_closes_each_connection_gets_a_new_one_each_time() -> None:
    with serve_images(EXAMPLES, IMAGE_HOST, keep_alive=False) as served:
        fetcher = Fetcher(limits(), ConnectionPool(max_idle=8))
        assert all(fetcher.fetch(served.url("cmp1.jpg")) == PHOTO for _ in range(5))
        assert (served.requests, served.connections) == (5, 5)
        assert fetcher.connections.idle_count() == 0


def test_a_kept_connection_serves_only_an_address_that_passes_the_check_again(monkeypatch: pytest.MonkeyPatch, keep_alive: ServedImages) -> None:
    """images.test first resolves to 127.0.0.2 (a connection is kept), then to a forbidden address,
    then to 127.0.0.3: the kept connection is never used for the new answers."""
    port = int(keep_alive.base_url.rsplit(":", 1)[1])
    answer = {"images.test": IMAGE_HOST}
    _resolve_to(monkeypatch, answer)
    fetcher = Fetcher(limits(), ConnectionPool(max_idle=8))
    assert fetcher.fetch(f"http://images.test:{port}/cmp1.jpg") == PHOTO
    answer["images.test"] = "127.0.0.1"
    with pytest.raises(ImageInputError) as error:
        fetcher.fetch(f"http://images.test:{port}/cmp1.jpg")
    assert error.value.code == "url_forbidden_address"
    answer["images.test"] = OTHER_HOST
    with pytest.raises(ImageInputError) as error:  # nothing listens there on this port: a new connection was tried
        fetcher.fetch(f"http://images.test:{port}/cmp1.jpg")
    assert error.value.code == "url_fetch_failed" and "cannot connect" in error.value.message, error.value.message
    assert (keep_alive.requests, keep_alive.connections) == (1, 1)
    answer["images.test"] = IMAGE_HOST
    assert fetcher.fetch(f"http://images.test:{port}/cmp1.jpg") == PHOTO
    assert (keep_alive.requests, keep_alive.connections) == (2, 1)


def _resolve_to(monkeypatch: pytest.MonkeyPatch, names: dict[str, str]) -> None:
    real = socket.getaddrinfo

    def resolver(host: str, port: int, *args: object, **kwargs: object) -> list:
        if host not in names:
            return real(host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (names[host], port))]

    monkeypatch.setattr(socket, "getaddrinfo", resolver)


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for images.test (and nothing else)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=images.test", "-addext", "subjectAltName=DNS:images.test", "-addext", "basicConstraints=critical,CA:TRUE"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def test_https_connections_are_verified_for_their_host_and_reused(monkeypatch: pytest.MonkeyPatch, certificate: tuple[Path, Path]) -> None:
    cert, _ = certificate
    _resolve_to(monkeypatch, {"images.test": IMAGE_HOST, "other.test": IMAGE_HOST})
    with serve_images(EXAMPLES, IMAGE_HOST, keep_alive=True, tls=certificate) as served:
        port = int(served.base_url.rsplit(":", 1)[1])
        fetcher = Fetcher(limits(), ConnectionPool(max_idle=8), ssl.create_default_context(cafile=str(cert)))
        assert all(fetcher.fetch(f"https://images.test:{port}/cmp1.jpg") == PHOTO for _ in range(5))
        assert (served.requests, served.connections) == (5, 1)
        # Same address, other name: the kept connection (verified for images.test) is not used for it.
        with pytest.raises(ImageInputError) as error:
            fetcher.fetch(f"https://other.test:{port}/cmp1.jpg")
        assert error.value.code == "url_fetch_failed" and "TLS" in error.value.message and "other.test" in error.value.message, error.value.message
        # The worker's own context trusts the system's CAs only.
        with pytest.raises(ImageInputError) as error:
            fetch_url(f"https://images.test:{port}/cmp1.jpg", limits())
        assert error.value.code == "url_fetch_failed" and "CERTIFICATE_VERIFY_FAILED" in error.value.message, error.value.message
        assert served.requests == 5


@pytest.fixture
def closes_after_answering() -> Iterator[tuple[str, list[int]]]:
    """Answers as if keeping the connection alive, then closes it: the next request on it would fail."""
    listener = socket.socket()
    listener.bind((IMAGE_HOST, 0))
    listener.listen(16)
    accepted: list[int] = []

    def serve(conn: socket.socket, _: object) -> None:
        accepted.append(1)
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(PHOTO) + PHOTO)

    accept_each(listener, serve)
    yield f"http://{IMAGE_HOST}:{listener.getsockname()[1]}", accepted
    listener.close()


def test_a_kept_connection_the_server_closed_is_replaced(closes_after_answering: tuple[str, list[int]]) -> None:
    base_url, accepted = closes_after_answering
    fetcher = Fetcher(limits(), ConnectionPool(max_idle=8))
    for _ in range(3):
        assert fetcher.fetch(f"{base_url}/x.jpg") == PHOTO
        time.sleep(0.05)  # the close reaches this side: found stale before reuse
    assert len(accepted) == 3


# --- fairness and withdrawal ---------------------------------------------------------------------


@dataclass
class SilentServer:
    """Accepts connections and reads requests, never answers; counts connections opened and still open."""

    base_url: str = ""
    opened: int = 0
    open_now: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    listener = socket.socket()
    listener.bind((IMAGE_HOST, 0))
    listener.listen(1024)
    server = SilentServer(f"http://{IMAGE_HOST}:{listener.getsockname()[1]}")

    def hold(conn: socket.socket) -> None:
        with conn:
            while conn.recv(4096):
                pass
        with server.lock:
            server.open_now -= 1

    def opened(conn: socket.socket, _: object) -> None:
        with server.lock:
            server.opened += 1
            server.open_now += 1
        threading.Thread(target=hold, args=(conn,), daemon=True).start()

    accept_each(listener, opened)
    yield server
    listener.close()


def test_requests_share_the_fetch_threads_and_a_withdrawn_one_stops(silent: SilentServer, keep_alive: ServedImages) -> None:
    withdrawn = threading.Event()
    with ThreadPoolExecutor(4) as pool:
        queue = FetchQueue(pool, Fetcher(limits(timeout_s=30)), per_request=2)
        hostile = queue.fetch_all([f"{silent.base_url}/{i}.jpg" for i in range(64)], withdrawn.is_set)
        time.sleep(0.5)
        started = time.monotonic()
        assert queue.fetch_all([keep_alive.url("cmp1.jpg")], lambda: False).next_body() == PHOTO
        print(f"one-URL request beside 64 silent URLs: {time.monotonic() - started:.3f} s")
        assert silent.opened == 2  # the per-request cap
        withdrawn.set()
        stopped = time.monotonic()
        codes = set()
        for _ in range(64):
            with pytest.raises(ImageInputError) as error:
                hostile.next_body()
            codes.add(error.value.code)
        print(f"64 silent URLs all ended {time.monotonic() - stopped:.2f} s after the request was withdrawn")
        assert codes == {"request_withdrawn"}
        time.sleep(0.5)
        assert (silent.opened, silent.open_now) == (2, 0)


def test_a_request_holds_at_most_its_share_of_fetched_bodies(keep_alive: ServedImages) -> None:
    with ThreadPoolExecutor(8) as pool:
        queue = FetchQueue(pool, Fetcher(limits(), ConnectionPool(max_idle=8)), per_request=3)
        fetches = queue.fetch_all([keep_alive.url("cmp1.jpg")] * 10, lambda: False)
        time.sleep(1.0)
        assert keep_alive.requests == 3  # fetched, not taken: the next ones wait
        assert [fetches.next_body() for _ in range(10)] == [PHOTO] * 10
        assert keep_alive.requests == 10


# --- through the service -------------------------------------------------------------------------


def test_hosts_that_used_to_poison_a_chunk_are_item_errors(service: Stack, image_server: ImageServer) -> None:
    inputs = [
        image_server.url("cmp1.jpg"),
        "http://bücher.example/x.png",
        f"http://{LONG_LABEL_HOST}/x.png",
        image_server.url(f"redirect?to=http://{LONG_LABEL_HOST}/x.png"),
        image_server.url("redirect?to=http://a..b/x.png"),
        image_server.url("cmp2.jpg"),
    ]
    with service.client() as client:
        job = submit(client, {"model": service.model("dinov2-tiny"), "input": inputs})
        state = wait_done(client, job["id"], timeout_s=60)
        results = sorted(all_results(client, job["id"]), key=lambda item: item["index"])
        assert state["status"] == "completed" and (state["completed"], state["failed"]) == (2, 4), state
        codes = [item.get("error", {}).get("code") for item in results]
        print("item codes:", codes)
        assert codes[0] is None and codes[5] is None
        assert codes[1] in ("url_fetch_failed", "url_forbidden_address")  # encodes to xn--bcher-kva.example, which does not resolve
        assert codes[2:5] == ["invalid_url"] * 3
        response = client.post("/v1/embeddings", json={"model": service.model("dinov2-tiny"), "input": [inputs[0], inputs[2]]})
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_url", response.text
        assert client.post("/v1/embeddings", json={"input": [inputs[0]]}).status_code == 200
    assert service.worker.alive()


def test_a_request_of_256_silent_urls_does_not_delay_another_and_stops_when_withdrawn(service: Stack, image_server: ImageServer, silent: SilentServer) -> None:
    hostile_done = threading.Event()

    def hostile() -> None:
        with httpx.Client(base_url=service.base_url, timeout=8.0) as client, pytest.raises(httpx.ReadTimeout):
            client.post("/v1/embeddings", json={"input": [f"{silent.base_url}/{i}.jpg" for i in range(256)]})
        hostile_done.set()

    thread = threading.Thread(target=hostile)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while silent.opened == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert silent.opened > 0, "the 256-URL request never reached the silent server"
        with service.client() as client:
            started = time.monotonic()
            response = client.post("/v1/embeddings", json={"input": [image_server.url("cmp1.jpg")]})
            one_request_s = time.monotonic() - started
            assert response.status_code == 200, response.text
            started = time.monotonic()
            job = submit(client, {"input": [image_server.url("cmp2.jpg")]})
            state = wait_done(client, job["id"], timeout_s=60)
            one_job_s = time.monotonic() - started
        print(
            f"beside 256 silent URLs: one-URL request answered in {one_request_s:.2f} s, one-URL job completed in {one_job_s:.2f} s;"
            f" silent server saw {silent.opened} connections"
        )
        assert state["status"] == "completed" and state["completed"] == 1
        assert one_request_s < 8 and one_job_s < 8  # the old fetcher made them wait for 16 x 10 s timeouts
        assert silent.opened <= 4  # IMBEDDINGS_URL_FETCH_CONCURRENCY_PER_REQUEST's default
    finally:
        thread.join(30)
    assert hostile_done.is_set()
    gave_up = time.monotonic()
    while silent.open_now and time.monotonic() - gave_up < 15:
        time.sleep(0.1)
    print(f"all of the withdrawn request's connections closed {time.monotonic() - gave_up:.2f} s after its client hung up")
    assert silent.open_now == 0
    opened = silent.opened
    time.sleep(3)
    assert silent.opened == opened <= 4, "the withdrawn request went on fetching"


def test_a_cancelled_job_stops_fetching(service: Stack, silent: SilentServer) -> None:
    with service.client() as client:
        job = submit(client, {"input": [f"{silent.base_url}/{i}.jpg" for i in range(64)]})
        deadline = time.monotonic() + 30
        while silent.opened == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert silent.opened > 0, "the job never reached the silent server"
        time.sleep(1)
        assert client.delete(f"/v1/jobs/{job['id']}").status_code == 200
        cancelled = time.monotonic()
        while silent.open_now and time.monotonic() - cancelled < 15:
            time.sleep(0.1)
        print(f"cancelled job: {silent.opened} connections opened, all closed {time.monotonic() - cancelled:.2f} s after the cancel")
        assert silent.open_now == 0
        # Two chunks at a time (IMBEDDINGS_BULK_CONCURRENCY), four URLs each at the defaults.
        assert silent.opened <= 8
        opened = silent.opened
        time.sleep(3)
        assert silent.opened == opened, "the cancelled job went on fetching"
