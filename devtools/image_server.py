"""A local image server for tests and benchmarks: a directory over HTTP, kept-alive or one connection
per image, counting the connections and requests it sees. ``/redirect?to=URL`` answers 302 to URL."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit


@dataclass
class ServedImages:
    base_url: str
    connections: int = 0
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"


class _Handler(SimpleHTTPRequestHandler):
    # Headers and body go out in two writes: with Nagle on, a kept-alive client waits ~40 ms for
    # the delayed ACK between them, which no real image server does to it.
    disable_nagle_algorithm = True
    delay_s = 0.0
    served: ServedImages

    def setup(self) -> None:
        super().setup()
        with self.served.lock:
            self.served.connections += 1

    def do_GET(self) -> None:
        with self.served.lock:
            self.served.requests += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        parts = urlsplit(self.path)
        if parts.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", parse_qs(parts.query)["to"][0])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def serve_images(directory: Path, host: str, keep_alive: bool = False, delay_s: float = 0.0, tls: tuple[Path, Path] | None = None) -> Iterator[ServedImages]:
    """``keep_alive``: HTTP/1.1 with persistent connections; otherwise HTTP/1.0, a connection per
    image. Each answer can be made to take ``delay_s``. ``tls``: (certificate, key) files to serve
    HTTPS with."""
    served = ServedImages("")
    handler = type("Handler", (_Handler,), {"delay_s": delay_s, "served": served, "protocol_version": "HTTP/1.1" if keep_alive else "HTTP/1.0"})
    server = ThreadingHTTPServer((host, 0), partial(handler, directory=str(directory)))
    server.daemon_threads = True
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    served.base_url = f"{'https' if tls else 'http'}://{host}:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()
