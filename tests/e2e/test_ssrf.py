"""URL fetching cannot be pointed inside: every address spelling, redirects, DNS answers that change,
time and size limits. Refused servers are real listeners that must see no connection at all."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.support.sockets import accept_each
from tests.support.stack import IMAGE_HOST, Stack
from worker.errors import ImageInputError
from worker.images.fetch import FetchLimits, fetch_url


@dataclass
class Canary:
    """A listener that records every connection it accepts."""

    host: str
    port: int
    connections: list[str] = field(default_factory=list)


def _canary(host: str, family: int = socket.AF_INET) -> Iterator[Canary]:
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, 0))
    listener.listen(16)
    canary = Canary(host, listener.getsockname()[1])

    def record(conn: socket.socket, peer: object) -> None:
        canary.connections.append(str(peer))
        conn.close()

    accept_each(listener, record)
    yield canary
    listener.close()


@pytest.fixture
def canary() -> Iterator[Canary]:
    yield from _canary("127.0.0.1")


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def _refused(service: Stack, url: str) -> dict:
    with service.client() as client:
        response = client.post("/v1/embeddings", json={"input": [url]})
    assert response.status_code == 400, (url, response.text)
    return response.json()["error"]


LOOPBACK_SPELLINGS = [
    "127.0.0.1", "localhost", "127.1", "127.0.1", "2130706433", "0x7f000001", "0x7f.0.0.1", "0177.0.0.1",
    "017700000001", "127.000.000.001", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "0.0.0.0", "0",
]


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_loopback_spellings_are_refused_before_connecting(service: Stack, canary: Canary, host: str) -> None:
    error = _refused(service, f"http://{host}:{canary.port}/cat.jpg")
    assert error["code"] in ("url_forbidden_address", "url_fetch_failed"), error
    time.sleep(0.05)
    assert canary.connections == [], f"{host} reached the refused server"


def test_ipv6_loopback_is_refused(service: Stack) -> None:
    if not _has_ipv6_loopback():
        pytest.skip("this machine has no IPv6 loopback to listen on")  # the address check itself is covered below
    for canary in _canary("::1", socket.AF_INET6):
        assert _refused(service, f"http://[::1]:{canary.port}/x.jpg")["code"] == "url_forbidden_address"
        assert canary.connections == []


FORBIDDEN_ELSEWHERE = [
    "169.254.169.254", "[fd00:ec2::254]", "10.0.0.1", "172.16.5.4", "192.168.1.1", "100.64.0.1", "192.0.0.8", "198.18.0.1",
    "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255", "[::]", "[fe80::1]", "[fc00::1]", "[ff02::1]",
    "[2002:7f00:1::1]", "[64:ff9b::7f00:1]", "[2001:0:4136:e378:8000:63bf:80ff:fffe]", "[::ffff:169.254.169.254]",
]


@pytest.mark.parametrize("host", FORBIDDEN_ELSEWHERE)
def test_private_link_local_multicast_reserved_are_refused(service: Stack, host: str) -> None:
    started = time.monotonic()
    error = _refused(service, f"http://{host}/latest/meta-data/")
    assert error["code"] == "url_forbidden_address", error
    assert time.monotonic() - started < 2  # refused from the address itself, no connection attempted


@pytest.mark.parametrize("url", ["file:///etc/passwd", "gopher://127.0.0.1:70/", "ftp://example.com/a.jpg", "dict://127.0.0.1:11211/", "http:///nohost"])
def test_other_schemes_are_refused(service: Stack, url: str) -> None:
    assert _refused(service, url)["code"] == "invalid_url"


class _Redirector(BaseHTTPRequestHandler):
    target = ""

    def do_GET(self) -> None:
        hops = int(self.path.strip("/") or 0)
        self.send_response(302)
        self.send_header("Location", self.target if hops == 0 else f"/{hops - 1}")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def redirector(canary: Canary) -> Iterator[str]:
    """On the allowed address: redirects (after N hops for /N) to the refused canary."""
    handler = type("Handler", (_Redirector,), {"target": f"http://127.0.0.1:{canary.port}/inside"})
    server = ThreadingHTTPServer((IMAGE_HOST, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://{IMAGE_HOST}:{server.server_address[1]}"
    server.shutdown()


def test_redirect_into_the_network_is_refused(service: Stack, canary: Canary, redirector: str) -> None:
    assert _refused(service, f"{redirector}/0")["code"] == "url_forbidden_address"
    assert _refused(service, f"{redirector}/2")["code"] == "url_forbidden_address"  # re-checked at every hop
    assert canary.connections == []


def test_redirect_limit(service: Stack, redirector: str) -> None:
    assert _refused(service, f"{redirector}/9")["code"] == "url_too_many_redirects"


# --- the fetcher itself, in process, against local servers ---------------------------------------

class _Slow(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        if self.path == "/trickle":
            self.send_header("Content-Length", "100000")
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.2)
        else:  # /big: no Content-Length, more than the cap
            self.end_headers()
            for _ in range(64):
                self.wfile.write(b"y" * 4096)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def slow_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.2", 0), _Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.2:{server.server_address[1]}"
    server.shutdown()


LOCAL = (ipaddress.ip_network("127.0.0.2/32"),)


def test_total_timeout_stops_a_trickling_server(slow_server: str) -> None:
    started = time.monotonic()
    with pytest.raises(ImageInputError) as error:
        fetch_url(f"{slow_server}/trickle", FetchLimits(1.0, 3, 10**6, LOCAL))
    assert error.value.code == "url_fetch_timeout"
    assert time.monotonic() - started < 2.0


def test_body_cap_stops_reading(slow_server: str) -> None:
    with pytest.raises(ImageInputError) as error:
        fetch_url(f"{slow_server}/big", FetchLimits(5.0, 3, 50_000, LOCAL))
    assert error.value.code == "image_too_large"


def test_dns_answer_cannot_change_between_check_and_connect(monkeypatch: pytest.MonkeyPatch, canary: Canary, slow_server: str) -> None:
    """A rebinding resolver answers an allowed address first and a forbidden one after: the fetcher
    resolves once and connects to the address it checked."""
    port = int(slow_server.rsplit(":", 1)[1])
    answers = iter(["127.0.0.2", "127.0.0.1", "127.0.0.1"])
    calls = []
    real = socket.getaddrinfo

    def rebinding(host: str, *args: object, **kwargs: object) -> list:
        try:
            ipaddress.ip_address(host)
            return real(host, *args, **kwargs)  # a literal address is never looked up, as with a real resolver
        except ValueError:
            calls.append(host)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    with pytest.raises(ImageInputError) as error:  # reaches the allowed server, which trickles: times out
        fetch_url(f"http://rebind.test:{port}/trickle", FetchLimits(0.5, 0, 10**6, LOCAL))
    assert error.value.code == "url_fetch_timeout", error.value.message
    assert calls == ["rebind.test"] and canary.connections == []
