"""Fetch an image URL without letting the URL reach inside the network.

Every TCP connection goes through ``_GuardedBackend``: the host is resolved once, each address is
checked against the block rules, and the socket connects to that checked address (so a second DNS
answer cannot swap it: no rebinding window). The peer address is checked again after connecting.
Redirects are followed by hand, so every hop passes through the same check. A watchdog closes the
sockets when the total time budget runs out, so a server trickling bytes cannot hold a thread.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpcore

from worker.errors import ImageInputError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Special-purpose ranges that Python's ``is_global`` still calls global.
_ALSO_FORBIDDEN = tuple(ipaddress.ip_network(n) for n in ("100.64.0.0/10", "192.0.0.0/24", "192.88.99.0/24"))
_REDIRECTS = {301, 302, 303, 307, 308}
_USER_AGENT = b"Imbeddings/1.0 (+image fetcher)"


@dataclass(frozen=True)
class FetchLimits:
    timeout_s: float
    max_redirects: int
    max_bytes: int
    allowed_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_strings(cls, timeout_s: float, max_redirects: int, max_bytes: int, allowed: Iterable[str]) -> FetchLimits:
        networks = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in allowed)
        return cls(timeout_s, max_redirects, max_bytes, networks)


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, 6to4, Teredo, NAT64), if any."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_forbidden(address: IPAddress, allowed: tuple[IPNetwork, ...] = ()) -> bool:
    """True for every address that is not plainly public, unless an operator allowed its network.

    An IPv6 address that carries an IPv4 one (mapped, 6to4, Teredo, NAT64) is judged by the IPv4
    address it leads to.
    """
    if any(address in network for network in allowed if network.version == address.version):
        return False
    inner = embedded_ipv4(address)
    if inner is not None:
        return is_forbidden(inner, allowed)
    return (
        not address.is_global
        or address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or any(address in network for network in _ALSO_FORBIDDEN if network.version == address.version)
    )


class _GuardedBackend(httpcore.SyncBackend):
    """Resolves, checks and connects to the checked address; remembers sockets for the watchdog."""

    def __init__(self, allowed: tuple[IPNetwork, ...]) -> None:
        self._allowed = allowed
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None, socket_options: Iterable[tuple] | None = None) -> httpcore.NetworkStream:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ImageInputError("url_fetch_failed", f"cannot resolve host {host!r}: {exc.strerror}") from None
        candidates = []
        for _family, _type, _proto, _name, sockaddr in infos:
            address = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
            if not is_forbidden(address, self._allowed):
                candidates.append(str(address))
        if not candidates:
            raise ImageInputError("url_forbidden_address", f"host {host!r} resolves only to addresses that may not be fetched (private, loopback, link-local, multicast or reserved)")
        last_error: Exception | None = None
        for candidate in dict.fromkeys(candidates):
            try:
                stream = super().connect_tcp(candidate, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last_error = exc
                continue
            sock: socket.socket = stream.get_extra_info("socket")
            peer = ipaddress.ip_address(sock.getpeername()[0].split("%", 1)[0])
            if is_forbidden(peer, self._allowed):
                stream.close()
                raise ImageInputError("url_forbidden_address", f"connection to {host!r} reached a forbidden address")
            with self._lock:
                if self._closed:
                    stream.close()
                    raise ImageInputError("url_fetch_timeout", "URL fetch ran out of time")
                self._sockets.append(sock)
            return stream
        raise ImageInputError("url_fetch_failed", f"cannot connect to {host!r}: {last_error}")

    def abort(self) -> None:
        with self._lock:
            self._closed = True
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _check_url(url: str) -> None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError as exc:
        raise ImageInputError("invalid_url", f"malformed URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ImageInputError("invalid_url", f"URL scheme {parts.scheme!r} is not allowed (only http and https)")
    if not parts.hostname:
        raise ImageInputError("invalid_url", "URL has no host")


def fetch_url(url: str, limits: FetchLimits, ssl_context: ssl.SSLContext | None = None) -> bytes:
    """The body of ``url`` after at most ``limits.max_redirects`` redirects, within ``limits.timeout_s`` in all."""
    backend = _GuardedBackend(limits.allowed_networks)
    deadline = time.monotonic() + limits.timeout_s
    watchdog = threading.Timer(limits.timeout_s, backend.abort)
    watchdog.daemon = True
    watchdog.start()
    try:
        with httpcore.ConnectionPool(network_backend=backend, ssl_context=ssl_context or ssl.create_default_context(), retries=0, max_connections=1) as pool:
            for _hop in range(limits.max_redirects + 1):
                _check_url(url)
                location = _get(pool, url, deadline, limits.max_bytes)
                if isinstance(location, bytes):
                    return location
                url = location
            raise ImageInputError("url_too_many_redirects", f"more than {limits.max_redirects} redirects")
    except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError) as exc:
        if time.monotonic() >= deadline:
            raise ImageInputError("url_fetch_timeout", f"URL fetch took longer than {limits.timeout_s:g} s") from None
        raise ImageInputError("url_fetch_failed", f"URL fetch failed: {type(exc).__name__}: {exc}") from None
    finally:
        watchdog.cancel()


def _get(pool: httpcore.ConnectionPool, url: str, deadline: float, max_bytes: int) -> bytes | str:
    remaining = max(0.001, deadline - time.monotonic())
    timeouts = {"connect": remaining, "read": remaining, "write": remaining, "pool": remaining}
    headers = [(b"User-Agent", _USER_AGENT), (b"Accept", b"image/*")]
    with pool.stream("GET", url, headers=headers, extensions={"timeout": timeouts}) as response:
        if response.status in _REDIRECTS:
            location = _header(response.headers, b"location")
            if not location:
                raise ImageInputError("url_fetch_failed", f"redirect ({response.status}) without a Location header")
            return urljoin(url, location)
        if response.status >= 400:
            raise ImageInputError("url_http_error", f"URL answered HTTP {response.status}")
        declared = _header(response.headers, b"content-length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise ImageInputError("image_too_large", f"URL body is {int(declared)} bytes, over the limit of {max_bytes}")
        body = bytearray()
        for chunk in response.iter_stream():
            body += chunk
            if len(body) > max_bytes:
                raise ImageInputError("image_too_large", f"URL body exceeds the limit of {max_bytes} bytes")
            if time.monotonic() >= deadline:
                raise httpcore.ReadTimeout("deadline")
        return bytes(body)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None
