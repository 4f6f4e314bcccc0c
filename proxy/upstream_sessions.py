"""The providers' HTTP sessions of a process, kept across config reloads.

Each HTTP provider sends through its own ``aiohttp.ClientSession`` (its connection pool). A reload builds a new
Gateway with new providers; had each opened a new pool, every reload would drop the open upstream connections
and the first requests after it would each open one again: a TCP and a TLS handshake (two round trips to a
remote provider, and the handshake's CPU) on their way to the first token. So a provider whose pool is configured as before
(:func:`pool_key`) takes its predecessor's session, and a session is closed when the last provider using it
closes (the old Gateway's, once its requests are done, or at shutdown). A change of a provider's key, headers,
priority, models or timeouts keeps the pool; a change of its name, type, base URL or pool settings opens a new one.
"""
from __future__ import annotations

from typing import Any, Callable

import aiohttp

from .pool import SweepingConnector

__all__ = ["SharedSessions", "pool_key", "close_session"]


def pool_key(config: Any) -> tuple[Any, ...]:
    """What a provider's session is made of: the same key, the same session across a reload."""
    c = config
    return (c.name, c.type, c.base_url, c.max_connections, c.max_keepalive_connections, c.keepalive_expiry,
            c.connect_timeout)


async def close_session(session: aiohttp.ClientSession) -> None:
    """Close a session: its idle connections a batch per loop iteration first (a pool of 1,000 closed at once
    stalls every live stream ~40 ms), then the session."""
    connector = session.connector
    if isinstance(connector, SweepingConnector) and not session.closed:
        await connector.close_idle()
    await session.close()


class SharedSessions:
    """Sessions by :func:`pool_key`, each with the number of providers using it (``process_state``, handed from
    each Gateway to its successor)."""

    def __init__(self) -> None:
        self._sessions: dict[tuple[Any, ...], list[Any]] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def acquire(self, key: tuple[Any, ...], make: Callable[[], aiohttp.ClientSession]) -> aiohttp.ClientSession:
        """The session of ``key``: the one in use, or a new one from ``make``."""
        entry = self._sessions.get(key)
        if entry is None or entry[0].closed:
            entry = self._sessions[key] = [make(), 0]
        entry[1] += 1
        return entry[0]  # type: ignore[no-any-return]

    async def release(self, key: tuple[Any, ...], session: aiohttp.ClientSession) -> None:
        """A provider is done with ``session``: closed once no provider uses it."""
        entry = self._sessions.get(key)
        if entry is None or entry[0] is not session:
            await close_session(session)
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del self._sessions[key]
            await close_session(session)
