"""Hosts on a private network, made of Linux network namespaces that the test creates and removes.

A "switch" namespace holds a bridge; each host is a namespace joined to it by a veth pair, with
loopback up and one address in a private /24 that exists only inside these namespaces. Nothing is
added to the namespace the tests run in, and no route leads out: traffic between hosts crosses the
bridge and goes nowhere else. Processes run on a host through ``ip netns exec``; the test's own
sockets (HTTP clients, readiness pings, a photo server) are made by threads that entered the host's
namespace with ``setns``, which moves only the calling thread.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

CLONE_NEWNET = 0x40000000
SUBNET = "10.231.0"

P = ParamSpec("P")
T = TypeVar("T")


class NamespacesUnavailable(RuntimeError):
    pass


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise NamespacesUnavailable(f"ip {' '.join(args)}: {result.stderr.strip() or result.returncode}")


def _enter(namespace: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns into {namespace}: {os.strerror(errno)}")
    finally:
        os.close(fd)


@dataclass
class Host:
    namespace: str
    address: str
    _threads: ThreadPoolExecutor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._threads = ThreadPoolExecutor(max_workers=4, thread_name_prefix=self.namespace, initializer=_enter, initargs=(self.namespace,))

    @property
    def launcher(self) -> list[str]:
        return ["ip", "netns", "exec", self.namespace]

    def run(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Call ``function`` on a thread inside this host's namespace: the sockets it opens are this host's."""
        return self._threads.submit(function, *args, **kwargs).result()

    def close(self) -> None:
        self._threads.shutdown(wait=True, cancel_futures=True)


class Network:
    """``hosts`` names become hosts ``SUBNET.1``, ``SUBNET.2``, ... in that order."""

    def __init__(self, hosts: list[str]) -> None:
        self.prefix = f"imb-{os.getpid()}"
        self.switch = f"{self.prefix}-sw"
        self.namespaces: list[str] = []
        self.hosts: dict[str, Host] = {}
        try:
            self._add_namespace(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for number, name in enumerate(hosts, start=1):
                self._add_host(name, f"{SUBNET}.{number}")
        except BaseException:
            self.close()
            raise

    def _add_namespace(self, namespace: str) -> None:
        _ip("netns", "add", namespace)
        self.namespaces.append(namespace)
        _ip("-n", namespace, "link", "set", "lo", "up")

    def _add_host(self, name: str, address: str) -> None:
        namespace = f"{self.prefix}-{name}"
        self._add_namespace(namespace)
        port = f"p-{name}"
        # Both ends are created inside namespaces: the veth never exists in the tests' own namespace.
        _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        self.hosts[name] = Host(namespace, address)

    def close(self) -> None:
        """Remove every namespace (their veths go with them). Processes on the hosts must be stopped first."""
        for host in self.hosts.values():
            host.close()
        for namespace in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True, timeout=30)
        self.namespaces.clear()
