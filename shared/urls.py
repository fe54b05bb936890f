"""The syntax of an image URL, checked the same way by the API (on the request) and the worker (on
every redirect it follows): http or https, a port that parses, and a host."""

from __future__ import annotations

from urllib.parse import SplitResult, urlsplit

SCHEMES = ("http", "https")


class InvalidUrl(ValueError):
    """The message says what is wrong with the URL."""


def split_http_url(url: str) -> SplitResult:
    """The URL's parts, its port checked; ``InvalidUrl`` when it is not a fetchable http(s) URL."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError as exc:
        raise InvalidUrl(f"malformed URL ({exc})") from None
    if parts.scheme.lower() not in SCHEMES:
        raise InvalidUrl(f"URL scheme {parts.scheme!r} is not allowed (only http and https)")
    if not parts.hostname:
        raise InvalidUrl("URL has no host")
    return parts
