"""Raw TCP servers for tests that need a server misbehaving in ways an HTTP server library will not."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable


def address(base_url: str) -> tuple[str, int]:
    """The (host, port) a test's ``http://host:port`` base URL names, for a raw connection to it."""
    host, port = base_url.removeprefix("http://").split(":")
    return host, int(port)


def accept_each(listener: socket.socket, handle: Callable[[socket.socket, object], None]) -> None:
    """Hands every connection ``listener`` accepts, with its peer address, to ``handle`` (on one
    daemon thread, in the order they come), until the listener is closed."""

    def accept() -> None:
        while True:
            try:
                conn, peer = listener.accept()
            except OSError:
                return
            handle(conn, peer)

    threading.Thread(target=accept, daemon=True).start()
