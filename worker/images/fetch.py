"""Fetch an image URL without letting the URL reach inside the network.

For every URL (and every redirect hop) the host is resolved once, each address is checked against
the block rules, and the socket connects to that checked address (so a second DNS answer cannot swap
it: no rebinding window); the peer address is checked again after connecting. A kept-alive
connection is reused only when its address is among the ones that passed this fresh check
(``worker.images.connections``). Every socket operation runs under a timeout cut from the URL's total time
budget, so a server trickling bytes cannot hold a thread past it, and no watchdog thread is needed.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import quote, urljoin, urlsplit

import h11
import idna

from worker import metrics
from worker.errors import ImageInputError
from worker.images.connections import Connection, ConnectionPool, PoolKey
from worker.tickets import Withdrawn

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Special-purpose ranges that Python's ``is_global`` still calls global.
_ALSO_FORBIDDEN = tuple(ipaddress.ip_network(n) for n in ("100.64.0.0/10", "192.0.0.0/24", "192.88.99.0/24"))
_REDIRECTS = {301, 302, 303, 307, 308}
_USER_AGENT = "Imbeddings/1.0 (+image fetcher)"
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Letters, digits, hyphen and underscore (in real use in host names, though not in IDNA).
_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
# How often a fetch that waits on a silent server looks up whether its request was withdrawn.
_WITHDRAWAL_POLL_S = 1.0
_RECV_BYTES = 64 * 1024


def never_withdrawn() -> bool:
    return False


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


@functools.cache
def worker_ssl_context() -> ssl.SSLContext:
    """One TLS context per process: building one loads the CA store, which costs more than a fetch."""
    return ssl.create_default_context()


@dataclass(frozen=True)
class Target:
    """Where one hop of a fetch goes: a checked, ASCII form of the URL."""

    scheme: str
    host: str
    port: int
    path: str

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


def parse_target(url: str) -> Target:
    """The URL's scheme, ASCII host, port and request path; ``invalid_url`` for anything else."""
    try:
        parts = urlsplit(url)
        port = parts.port
        hostname = parts.hostname
    except ValueError as exc:
        raise ImageInputError("invalid_url", f"malformed URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ImageInputError("invalid_url", f"URL scheme {parts.scheme!r} is not allowed (only http and https)")
    if not hostname:
        raise ImageInputError("invalid_url", "URL has no host")
    # Characters a request line cannot carry are percent-encoded, as browsers do; '%' stays as sent.
    path = quote(parts.path or "/", safe="/%!$&'()*+,;=:@~-._")
    if parts.query:
        path += "?" + quote(parts.query, safe="/?%!$&'()*+,;=:@~-._")
    return Target(scheme, ascii_host(hostname), port or _DEFAULT_PORTS[scheme], path)


def ascii_host(host: str) -> str:
    """The host as DNS and the Host header see it; ``invalid_url`` for one no resolver would take."""
    if ":" in host:  # an IPv6 literal (urlsplit removed the brackets)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ImageInputError("invalid_url", f"host [{host}] is not a valid IPv6 address") from None
        return host
    if not host.isascii():
        try:
            host = idna.encode(host, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError) as exc:
            raise ImageInputError("invalid_url", f"host {host!r} is not a valid internationalized domain name: {exc}") from None
    name = host.removesuffix(".")
    if len(name) > 253:
        raise ImageInputError("invalid_url", f"host name is {len(name)} characters long (at most 253)")
    for label in name.split("."):
        if len(label) > 63:
            raise ImageInputError("invalid_url", f"host {host!r} has a label of {len(label)} characters (at most 63)")
        if not _LABEL.fullmatch(label):
            raise ImageInputError("invalid_url", f"host {host!r} is not a valid host name (empty label or a character other than letters, digits, '-', '_')")
    return host


class _StaleConnection(Exception):
    """A kept-alive connection the server had closed before it saw the request."""


class Fetcher:
    """Fetches URLs for one worker: one TLS context, one pool of kept-alive connections."""

    def __init__(self, limits: FetchLimits, connections: ConnectionPool | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        self.limits = limits
        self.connections = connections or ConnectionPool(max_idle=0)
        self._ssl_context = ssl_context or worker_ssl_context()

    def fetch(self, url: str, withdrawn: Callable[[], bool] = never_withdrawn) -> bytes:
        """The body of ``url`` after at most ``max_redirects`` redirects, within ``timeout_s`` in all.

        Every failure is an ``ImageInputError``; ``withdrawn`` is asked now and then while a server
        keeps the fetch waiting, and a withdrawn fetch stops.
        """
        deadline = time.monotonic() + self.limits.timeout_s
        try:
            for _hop in range(self.limits.max_redirects + 1):
                target = parse_target(url)
                location = self._get(target, deadline, withdrawn)
                if isinstance(location, bytes):
                    return location
                url = urljoin(url, location)
            raise ImageInputError("url_too_many_redirects", f"more than {self.limits.max_redirects} redirects")
        except ImageInputError:
            raise
        except TimeoutError:
            raise self._timed_out() from None
        except (OSError, h11.ProtocolError) as exc:
            raise ImageInputError("url_fetch_failed", f"URL fetch failed: {type(exc).__name__}: {exc}") from None

    def _timed_out(self) -> ImageInputError:
        return ImageInputError("url_fetch_timeout", f"URL fetch took longer than {self.limits.timeout_s:g} s")

    def _get(self, target: Target, deadline: float, withdrawn: Callable[[], bool]) -> bytes | str:
        addresses = self._checked_addresses(target)
        connection = self.connections.take(target.scheme, target.host, target.port, [address for address, _ in addresses])
        if connection is not None:
            metrics.URL_CONNECTIONS.labels("reused").inc()
            try:
                return self._exchange(connection, target, deadline, withdrawn)
            except _StaleConnection:
                pass
        connection = self._connect(target, addresses, deadline)
        metrics.URL_CONNECTIONS.labels("opened").inc()
        try:
            return self._exchange(connection, target, deadline, withdrawn)
        except _StaleConnection:
            raise ImageInputError("url_fetch_failed", "the server closed the connection without answering") from None

    def _checked_addresses(self, target: Target) -> list[tuple[str, tuple]]:
        """Every address the host resolves to that may be fetched, with its socket address."""
        try:
            infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ImageInputError("url_fetch_failed", f"cannot resolve host {target.host!r}: {exc.strerror}") from None
        except UnicodeError as exc:
            raise ImageInputError("invalid_url", f"host {target.host!r} cannot be looked up: {exc}") from None
        allowed: dict[str, tuple] = {}
        for _family, _type, _proto, _name, sockaddr in infos:
            address = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
            if not is_forbidden(address, self.limits.allowed_networks):
                allowed.setdefault(sockaddr[0], sockaddr)
        if not allowed:
            raise ImageInputError(
                "url_forbidden_address",
                f"host {target.host!r} resolves only to addresses that may not be fetched (private, loopback, link-local, multicast or reserved)",
            )
        return list(allowed.items())

    def _connect(self, target: Target, addresses: list[tuple[str, tuple]], deadline: float) -> Connection:
        last_error: OSError | None = None
        for address, sockaddr in addresses:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._timed_out()
            sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.settimeout(remaining)
                sock.connect(sockaddr)
                peer = ipaddress.ip_address(sock.getpeername()[0].split("%", 1)[0])
                if is_forbidden(peer, self.limits.allowed_networks):
                    raise ImageInputError("url_forbidden_address", f"connection to {target.host!r} reached a forbidden address")
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if target.scheme == "https":
                    sock.settimeout(max(0.001, deadline - time.monotonic()))
                    sock = self._ssl_context.wrap_socket(sock, server_hostname=target.host)
            except ImageInputError:
                sock.close()
                raise
            except ssl.SSLError as exc:
                sock.close()
                raise ImageInputError("url_fetch_failed", f"TLS with {target.host!r} failed: {exc}") from None
            except OSError as exc:
                sock.close()
                if time.monotonic() >= deadline:
                    raise self._timed_out() from None
                last_error = exc
                continue
            return Connection(PoolKey(target.scheme, target.host, target.port, address), sock)
        raise ImageInputError("url_fetch_failed", f"cannot connect to {target.host!r}: {last_error}")

    def _exchange(self, connection: Connection, target: Target, deadline: float, withdrawn: Callable[[], bool]) -> bytes | str:
        """One GET on ``connection``: the body, or a redirect's Location. The connection goes back to
        the pool only after a clean, complete exchange."""
        kept = False
        answered = False
        try:
            request = h11.Request(method="GET", target=target.path, headers=[("Host", target.host_header), ("User-Agent", _USER_AGENT), ("Accept", "image/*")])
            try:
                connection.sock.settimeout(max(0.001, deadline - time.monotonic()))
                connection.sock.sendall(connection.http.send(request) + connection.http.send(h11.EndOfMessage()))
            except OSError:
                if connection.reused:
                    raise _StaleConnection from None
                raise
            body = bytearray()
            while True:
                event = connection.http.next_event()
                if event is h11.NEED_DATA:
                    data = self._receive(connection, deadline, withdrawn)
                    if not data and not answered and connection.reused:
                        raise _StaleConnection
                    connection.http.receive_data(data)
                    continue
                if isinstance(event, h11.InformationalResponse):
                    continue
                if isinstance(event, h11.Response):
                    answered = True
                    location = self._check_response(event)
                    if location is not None:
                        return location
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > self.limits.max_bytes:
                        raise ImageInputError("image_too_large", f"URL body exceeds the limit of {self.limits.max_bytes} bytes")
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:  # h11.ConnectionClosed before the message ended
                    raise ImageInputError("url_fetch_failed", "the server closed the connection before the body was complete")
            # Bytes after the response would be read as the next answer: such a connection is not kept.
            if connection.http.our_state is h11.DONE and connection.http.their_state is h11.DONE and not connection.http.trailing_data[0]:
                connection.http.start_next_cycle()
                self.connections.give_back(connection)
                kept = True
            return bytes(body)
        except (ConnectionResetError, BrokenPipeError):
            if connection.reused and not answered:
                raise _StaleConnection from None
            raise
        finally:
            if not kept:
                connection.close()

    def _receive(self, connection: Connection, deadline: float, withdrawn: Callable[[], bool]) -> bytes:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._timed_out()
            if withdrawn():
                raise ImageInputError(Withdrawn.CODE, "the request was withdrawn while this URL was being fetched")
            connection.sock.settimeout(min(remaining, _WITHDRAWAL_POLL_S))
            try:
                return connection.sock.recv(_RECV_BYTES)
            except TimeoutError:
                continue

    def _check_response(self, response: h11.Response) -> str | None:
        """A redirect's Location, None for a body to read; raises for errors and declared oversize."""
        if response.status_code in _REDIRECTS:
            location = _header(response.headers, b"location")
            if not location:
                raise ImageInputError("url_fetch_failed", f"redirect ({response.status_code}) without a Location header")
            return location
        if response.status_code >= 400:
            raise ImageInputError("url_http_error", f"URL answered HTTP {response.status_code}")
        declared = _header(response.headers, b"content-length")
        if declared and declared.isdigit() and int(declared) > self.limits.max_bytes:
            raise ImageInputError("image_too_large", f"URL body is {int(declared)} bytes, over the limit of {self.limits.max_bytes}")
        return None


def fetch_url(url: str, limits: FetchLimits) -> bytes:
    """One URL on a connection of its own (no reuse)."""
    return Fetcher(limits).fetch(url)


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key == name:  # h11 lower-cases header names
            try:
                return value.decode("utf-8").strip()
            except UnicodeDecodeError:
                return value.decode("latin-1").strip()
    return None
