"""The upstream connection pool: aiohttp's ``TCPConnector`` with a cap on idle connections.

aiohttp bounds a pool as a whole (``limit``: busy and idle connections together, the provider's
``max_connections``) and closes an idle connection ``keepalive_timeout`` (``keepalive_expiry``) after its last use,
all that expired in one callback. It has no bound on the idle ones, so a burst of N concurrent streams leaves N idle
connections, closed together later: each close costs ~40 µs of the event loop, and 1,000 of them stalled every live
stream for ~42 ms (measured in the benchmark, ~60 s after a wave of 1,000 streams). :class:`IdleCappedConnector`
keeps at most ``max_keepalive_connections`` idle connections per upstream (as httpx does, whose setting the seed's
providers block names): one released while that many are idle is closed at once, so the closes of a burst are
spread over its end, and the later sweep has at most that many to close.

The cap hooks aiohttp's ``_release`` and reads its ``_conns`` (internal to aiohttp, unchanged through 3.x); where
they are missing the cap is off, and a warning says so once. A pool whose ``limit`` is no more than the cap can
never hold more idle connections than that, so it gets aiohttp's own connector and the hook costs nothing.
"""
from __future__ import annotations

import inspect
from typing import Any

import aiohttp
import structlog

__all__ = ["IdleCappedConnector", "connector"]

log = structlog.get_logger("ssegate.upstream")


def _can_cap() -> bool:
    release = getattr(aiohttp.TCPConnector, "_release", None)
    try:
        return release is not None and "should_close" in inspect.signature(release).parameters
    except (TypeError, ValueError):
        return False


CAN_CAP = _can_cap()
_warned: list[bool] = []


class IdleCappedConnector(aiohttp.TCPConnector):
    """A ``TCPConnector`` that keeps at most ``max_idle`` idle connections per host (0: none; every connection is
    closed after its request)."""

    def __init__(self, *, max_idle: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_idle = max_idle

    def _release(self, key: Any, protocol: Any, *, should_close: bool = False) -> None:
        if not should_close:
            idle = self._conns.get(key)
            if (len(idle) if idle is not None else 0) >= self.max_idle:
                should_close = True
        _release(self, key, protocol, should_close=should_close)


#: aiohttp's own ``_release``, called directly (a ``super()`` call per released connection costs more).
_release = aiohttp.TCPConnector._release


def connector(*, max_idle: int, **kwargs: Any) -> aiohttp.TCPConnector:
    """The pool of one provider: capped at ``max_idle`` idle connections where this aiohttp allows it and the
    pool's ``limit`` (0: none) could exceed it."""
    limit = kwargs.get("limit", 100)
    if limit and limit <= max_idle:
        return aiohttp.TCPConnector(**kwargs)  # it cannot hold more idle connections than the cap
    if CAN_CAP:
        return IdleCappedConnector(max_idle=max_idle, **kwargs)
    if not _warned:
        _warned.append(True)
        log.warning("idle_connection_cap_unavailable", aiohttp=aiohttp.__version__,
                    detail="max_keepalive_connections has no effect with this aiohttp")
    return aiohttp.TCPConnector(**kwargs)
