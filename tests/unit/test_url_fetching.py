"""How a URL is read before anything is fetched: hosts no resolver takes, and names and paths sent in ASCII."""

from __future__ import annotations

import pytest

from tests.support.images import LONG_LABEL_HOST
from worker.errors import ImageInputError
from worker.images.fetch import parse_target


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (f"http://{LONG_LABEL_HOST}/x.png", "label of 64 characters"),
        ("http://" + ".".join(["a" * 60] * 5) + "/x.png", "at most 253"),
        ("http://a..b/x.png", "not a valid host name"),
        ("http://exa mple.com/x.png", "not a valid host name"),
        ("http://ex%41mple.com/x.png", "not a valid host name"),
        ("http://-\u0301.example/x.png", "not a valid internationalized domain name"),
        ("http://a\u200db.example/x.png", "not a valid internationalized domain name"),
        ("http://[::1/x.png", "malformed URL"),
        ("http://host:99999/x.png", "malformed URL"),
    ],
)
def test_hosts_no_resolver_takes_are_invalid_urls(url: str, reason: str) -> None:
    with pytest.raises(ImageInputError) as error:
        parse_target(url)
    assert error.value.code == "invalid_url" and reason in error.value.message, error.value.message


def test_internationalized_names_and_paths_are_sent_in_ascii() -> None:
    target = parse_target("https://Bücher.example:8443/bild ä.png?q=ü#frag")
    assert (target.host, target.port, target.path, target.host_header) == (
        "xn--bcher-kva.example",
        8443,
        "/bild%20%C3%A4.png?q=%C3%BC",
        "xn--bcher-kva.example:8443",
    )
    assert parse_target("http://[2001:db8::1]/").host_header == "[2001:db8::1]"
