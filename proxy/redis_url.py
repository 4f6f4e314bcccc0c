"""The shared Redis, from ``redis.url``: one server, or the master of a group that Redis Sentinel watches.

- ``redis://[[user]:password@]host:port/db``, ``rediss://`` (TLS) and ``unix://``: one server.
- ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]`` (``rediss+sentinel://`` for
  TLS): the current master of ``service``, asked of the listed Sentinels (port 26379 unless given). After a
  failover the next connection goes to the new master. The user and password are the master's; the Sentinels'
  own password, where they have one, is the ``sentinel_password`` query parameter.

Every "is Redis configured" check reads ``redis.url`` alone, so both kinds are configured the same way.
"""
from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import attrs

__all__ = ["SentinelTarget", "parse_sentinel_url", "check_redis_url", "redis_client", "SENTINEL_SCHEMES"]

SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}  # scheme -> TLS
DEFAULT_SENTINEL_PORT = 26379


@attrs.frozen
class SentinelTarget:
    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None
    ssl: bool = False


def parse_sentinel_url(url: str) -> SentinelTarget | None:
    """The Sentinel group a ``redis+sentinel://`` URL names; None for any other URL. Raises ValueError."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SENTINEL_SCHEMES:
        return None
    parts = urlsplit("//" + rest)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinels = []
    for entry in (e.strip() for e in hosts.split(",")):
        if entry.startswith("["):  # [IPv6]:port
            host, _, tail = entry[1:].partition("]")
            port = tail[1:] if tail.startswith(":") else tail
        else:
            host, _, port = entry.partition(":")
        if not host:
            raise ValueError(f"a Sentinel address is empty in {hosts!r}")
        if port and not port.isdigit():
            raise ValueError(f"the port of Sentinel {entry!r} is not a number")
        sentinels.append((host, int(port) if port else DEFAULT_SENTINEL_PORT))
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ValueError("no service name: redis+sentinel://host:26379/<service>[/db]")
    if len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(f"the path {parts.path!r} is not /<service>[/<db number>]")
    query = parse_qs(parts.query)
    unknown = set(query) - {"sentinel_password"}
    if unknown:
        raise ValueError(f"unknown query parameter {sorted(unknown)[0]!r} (known: sentinel_password)")
    return SentinelTarget(sentinels=tuple(sentinels), service=unquote(path[0]),
                          db=int(path[1]) if len(path) == 2 else 0, username=username, password=password,
                          sentinel_password=query.get("sentinel_password", [None])[0],
                          ssl=SENTINEL_SCHEMES[scheme.lower()])


def check_redis_url(url: str) -> None:
    """Raise ValueError, saying what is wrong, unless ``url`` is one of the two kinds above."""
    if parse_sentinel_url(url) is not None:
        return
    from redis.connection import parse_url

    parse_url(url)


def redis_client(url: str, *, max_connections: int, socket_timeout: float, connect_timeout: float) -> Any:
    """The process's ``redis.asyncio.Redis`` for ``url``: one retry on a dropped connection (a pooled socket gone
    stale after a Redis restart or a failover, whose new connection finds the new master). Not on timeouts: a
    command that timed out may have run, and limits must not be charged twice."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError

    common: dict[str, Any] = dict(socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout,
                                  retry=Retry(NoBackoff(), 1), retry_on_error=[RedisConnectionError])
    target = parse_sentinel_url(url)
    if target is None:
        return aioredis.Redis.from_url(url, max_connections=max_connections, health_check_interval=30, **common)
    from redis.asyncio.sentinel import Sentinel

    sentinel_kwargs: dict[str, Any] = dict(socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout)
    if target.sentinel_password is not None:
        sentinel_kwargs["password"] = target.sentinel_password
    if target.ssl:
        sentinel_kwargs["ssl"] = True
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_kwargs)
    return sentinel.master_for(target.service, db=target.db, username=target.username, password=target.password,
                               ssl=target.ssl, max_connections=max_connections, **common)
