"""The upstream connection pool: aiohttp's ``TCPConnector`` with a cap on idle connections.

aiohttp bounds a pool as a whole (``limit``: busy and idle connections together, the provider's
``max_connections``) and closes an idle connection ``keepalive_timeout`` (``keepalive_expiry``) after its last use,
all that expired in one callback. It has no bound on the idle ones, so a burst of N concurrent streams leaves N idle
connections, closed together later: each close costs ~40 µs of the event loop, and 1,000 of them stalled every live
stream for ~42 ms (measured in the benchmark, ~60 s after a wave of 1,000 streams). :class:`IdleCappedConnector`
keeps at most ``max_keepalive_connections`` idle connections per upstream (as httpx does, whose setting the seed's
providers block names): one released while that many are idle is closed at once, so the closes of a burst are
spread over its end, and the later sweep has at most that many to close.

The cap hooks aiohttp's ``_release`` and reads its ``_conns`` (internal to aiohttp; the suite runs on 3.13 and 3.14,
the versions setup.cfg allows); where they are missing the cap is off, and a warning says so once. A pool whose
``limit`` is no more than the cap can never hold more idle connections than that, so it does without the hook,
which costs a call per request.

Within the cap, a burst still leaves up to ``max_keepalive_connections`` idle connections that expire together,
and aiohttp let the next request close them: its pool hands out the oldest idle connection first, and closes each
expired one it meets on the way, all in that request's path (and its own sweep ran only every
``keepalive_expiry``, up to twice that after a connection's last use). After a wave of 1,000 streams the first
request ~60 s later took 35–76 ms to its first token, against ~2 ms. :class:`SweepingConnector` takes the expired
connections out of the pool shortly before they expire, and closes them :data:`CLOSE_BATCH` per event-loop
iteration.
"""
from __future__ import annotations

import asyncio
import inspect
import math
import time
import weakref
from collections import defaultdict, deque
from typing import Any

import aiohttp
import structlog

__all__ = ["SweepingConnector", "IdleCappedConnector", "connector", "CLOSE_BATCH"]

log = structlog.get_logger("ssegate.upstream")


def _can_cap() -> bool:
    release = getattr(aiohttp.TCPConnector, "_release", None)
    try:
        return release is not None and "should_close" in inspect.signature(release).parameters
    except (TypeError, ValueError):
        return False


CAN_CAP = _can_cap()
_warned: list[bool] = []


#: Idle connections closed per event-loop iteration when many expire together (a close costs ~40 µs of the loop).
CLOSE_BATCH = 64
#: How long before it expires an idle connection is taken out of the pool, at most (seconds; a quarter of a
#: ``keepalive_expiry`` shorter than 4 s): the sweep then runs before a request could meet it expired, as long as
#: the loop is not late by that much.
SWEEP_AHEAD = 1.0


def _sweep(ref: "weakref.ref[SweepingConnector]") -> None:
    connector = ref()
    if connector is not None:
        connector._cleanup()


class SweepingConnector(aiohttp.TCPConnector):
    """aiohttp's ``TCPConnector`` whose sweep of expired idle connections runs before they expire and closes them a
    batch per loop iteration, so that no request pays for closing them and the loop never stalls on a thousand
    closes (``_cleanup``, which aiohttp schedules, replaced; nothing changes per request)."""

    def __init__(self, **kwargs: Any) -> None:
        # The first sweep aiohttp schedules on a release, exactly when it is due (not rounded up to a whole second).
        kwargs.setdefault("timeout_ceil_threshold", math.inf)
        super().__init__(**kwargs)
        #: Connections taken out of the pool and not closed yet: (connection key, protocol).
        self._doomed: deque[tuple[Any, Any]] = deque()
        #: The next batch of closes, when one is scheduled (one chain of batches at a time).
        self._closer: asyncio.Handle | None = None
        #: aiohttp's pool state as this sweep reads it (internal to aiohttp): idle connections in a deque per host,
        #: oldest first, stamped with ``time.monotonic()``, as aiohttp keeps them since 3.11 (3.9 and 3.10 kept a
        #: list, used from its end, stamped with the loop's time). Otherwise (an aiohttp that keeps them another
        #: way) aiohttp's own sweep runs.
        conns = getattr(self, "_conns", None)
        self._sweeps = isinstance(conns, defaultdict) and conns.default_factory is deque and all(
            hasattr(self, name) for name in ("_cleanup_handle", "_keepalive_timeout", "_closed", "_loop"))

    def _cleanup(self) -> None:
        if not self._sweeps:
            return super()._cleanup()
        handle = self._cleanup_handle
        if handle is not None:
            handle.cancel()
            self._cleanup_handle = None
        timeout = self._keepalive_timeout
        if timeout is None or self._closed:
            return
        ahead = min(SWEEP_AHEAD, timeout / 4)
        now = time.monotonic()
        deadline = now - timeout + ahead  # idle since then: it expires before the next sweep could come
        doomed = self._doomed
        oldest = math.inf
        pools = self._conns
        for key in [k for k, conns in pools.items() if conns]:
            conns = pools[key]  # released in order: the oldest on the left, where aiohttp takes from
            while conns and conns[0][1] <= deadline:
                doomed.append((key, conns.popleft()[0]))
            if conns:
                oldest = min(oldest, conns[0][1])
            else:
                del pools[key]
        if doomed and self._closer is None:
            self._close_doomed()
        if oldest != math.inf:
            # The next sweep as the oldest connection left comes within `ahead` of expiring, and no sooner than
            # half of that from now (what expires in between is still taken before it expires).
            wait = max(oldest + timeout - ahead - now, ahead / 2)
            self._cleanup_handle = self._loop.call_at(self._loop.time() + wait, _sweep, weakref.ref(self))

    def _close_doomed(self) -> None:
        self._closer = None
        doomed = self._doomed
        track_ssl = not getattr(self, "_cleanup_closed_disabled", True)
        for _ in range(min(CLOSE_BATCH, len(doomed))):
            key, proto = doomed.popleft()
            transport = proto.transport
            proto.close()
            if track_ssl and key.is_ssl:  # (as aiohttp does: aborted later if the TLS close hangs)
                self._cleanup_closed_transports.append(transport)
        if doomed:
            self._closer = self._loop.call_soon(self._close_doomed)

    async def close_idle(self) -> None:
        """Close every idle connection, :data:`CLOSE_BATCH` per loop iteration (before closing the pool: aiohttp
        closes them all at once)."""
        if not self._sweeps:
            return
        doomed = self._doomed
        pools = self._conns
        for key in list(pools):
            doomed.extend((key, proto) for proto, _ in pools.pop(key))
        if doomed and self._closer is None:
            self._close_doomed()
        while doomed:
            await asyncio.sleep(0)

    def _close(self, *args: Any, **kwargs: Any) -> Any:
        waiters = super()._close(*args, **kwargs)
        doomed = self._doomed
        while doomed:  # closing the pool: what the sweep had not closed yet, now
            _, proto = doomed.popleft()
            proto.close()
            closed = getattr(proto, "closed", None)
            if closed is not None and waiters is not None:
                waiters.append(closed)
        return waiters


class IdleCappedConnector(SweepingConnector):
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
        return SweepingConnector(**kwargs)  # it cannot hold more idle connections than the cap
    if CAN_CAP:
        return IdleCappedConnector(max_idle=max_idle, **kwargs)
    if not _warned:
        _warned.append(True)
        log.warning("idle_connection_cap_unavailable", aiohttp=aiohttp.__version__,
                    detail="max_keepalive_connections has no effect with this aiohttp")
    return SweepingConnector(**kwargs)
