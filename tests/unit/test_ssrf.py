"""Which addresses a worker may fetch from, decided on the address alone."""

from __future__ import annotations

import ipaddress

import pytest

from worker.images.fetch import is_forbidden


@pytest.mark.parametrize(
    ("address", "forbidden"),
    [
        ("8.8.8.8", False), ("1.1.1.1", False), ("2606:4700:4700::1111", False), ("93.184.216.34", False),
        ("127.0.0.1", True), ("10.1.2.3", True), ("169.254.169.254", True), ("100.100.100.200", True),
        ("0.0.0.0", True), ("224.0.0.251", True), ("240.1.2.3", True), ("::1", True), ("::", True),
        ("::ffff:10.0.0.1", True), ("::ffff:8.8.8.8", False), ("2002:0a00:0001::", True), ("2002:0808:0808::", False),
        ("64:ff9b::a00:1", True), ("64:ff9b::808:808", False), ("2001:0:4136:e378:8000:63bf:f5ff:fffe", True),
        ("fe80::1", True), ("fc00::1", True), ("ff02::1", True), ("2001:db8::1", True),
    ],
)
def test_address_rules(address: str, forbidden: bool) -> None:
    assert is_forbidden(ipaddress.ip_address(address)) is forbidden


def test_allowed_networks_open_a_range() -> None:
    internal = (ipaddress.ip_network("10.20.0.0/16"),)
    assert not is_forbidden(ipaddress.ip_address("10.20.3.4"), internal)
    assert is_forbidden(ipaddress.ip_address("10.21.3.4"), internal)
