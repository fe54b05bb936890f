"""The ``sentinel://`` form of ``IMBEDDINGS_REDIS_URL``: Redis Sentinel finds the current primary.

``sentinel://[user:password@]host1:26379,host2:26379,host3:26379[/db]`` lists the Sentinels, and
``IMBEDDINGS_REDIS_SENTINEL_MASTER`` names the primary they monitor. The user and password are those
of the Redis servers; the Sentinels themselves are asked without them. Every client of the service
(the API's async clients, the workers' sync clients and the Celery broker) asks the Sentinels for
the primary's address whenever it connects, so a failover needs no restart of anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

SCHEME = "sentinel://"
DEFAULT_PORT = 26379

# Options of the connections to the Sentinels themselves. A Sentinel answers from memory, so a
# slow one is a dead host: one second to connect, then the next Sentinel in the list is asked.
SENTINEL_QUERY_TIMEOUTS: dict[str, float] = {"socket_connect_timeout": 1.0, "socket_timeout": 2.0}


def is_sentinel_url(url: str) -> bool:
    return url.startswith(SCHEME)


@dataclass(frozen=True)
class SentinelUrl:
    sentinels: tuple[tuple[str, int], ...]
    db: int
    username: str | None
    password: str | None

    @classmethod
    def parse(cls, url: str) -> SentinelUrl:
        """Raises ``ValueError`` saying which part of the URL is wrong."""
        if not is_sentinel_url(url):
            raise ValueError(f"a Sentinel URL starts with {SCHEME}")
        rest = url[len(SCHEME) :]
        if "?" in rest or "#" in rest:
            raise ValueError("options in a sentinel:// URL are not supported; Imbeddings sets each Redis option itself")
        netloc, _, path = rest.partition("/")
        userinfo, _, hosts = netloc.rpartition("@")
        username, _, password = userinfo.partition(":")
        sentinels = tuple(_host_port(part.strip()) for part in hosts.split(","))
        try:
            db = int(path or "0")
        except ValueError:
            raise ValueError(f"the database after the hosts must be a number, got {path!r}") from None
        if db < 0:
            raise ValueError(f"the database must not be negative, got {db}")
        return cls(sentinels, db, unquote(username) or None, unquote(password) or None)

    def server_options(self) -> dict[str, object]:
        """What a redis-py ``Sentinel`` passes on to its connections to the primary."""
        return {"db": self.db, "username": self.username, "password": self.password}

    def kombu_url(self) -> str:
        """kombu's form: one ``sentinel://`` URL per Sentinel, joined by ``;`` (its failover list)."""
        auth = ""
        if self.username or self.password:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password or '', safe='')}@"
        return ";".join(f"{SCHEME}{auth}{_netloc(host)}:{port}/{self.db}" for host, port in self.sentinels)


def _host_port(part: str) -> tuple[str, int]:
    if not part:
        raise ValueError("an empty Sentinel address in the host list (write sentinel://host1:26379,host2:26379/0)")
    try:
        parsed = urlsplit(f"//{part}")
        port = parsed.port
    except ValueError as exc:
        raise ValueError(f"Sentinel address {part!r}: {exc}") from None
    if not parsed.hostname:
        raise ValueError(f"Sentinel address {part!r} has no host")
    return parsed.hostname, port or DEFAULT_PORT


def _netloc(host: str) -> str:
    return f"[{host}]" if ":" in host else host
