"""One timer for all live requests: first-token, idle and total deadlines, and stream keepalives.

Arming a timer per chunk (``asyncio.wait_for`` around every read) costs more than relaying the chunk. Instead
each live request registers a :class:`Guard`; the relay only stamps ``guard.last_event`` per upstream read, and a
single background task looks at every guard a few times per shortest interval. A guard past its deadline
cancels its request's task (the relay turns that into a timeout); an idle stream gets a ``: keepalive`` comment.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable

__all__ = ["Watchdog", "Guard"]


class Guard:
    """Deadlines and keepalive state of one live request (the relay owns it; the watchdog reads it).

    ``total_deadline`` is the request's deadline across all attempts; each attempt adds its own
    ``attempt_deadline`` (the provider's ``timeout``), ``first_deadline`` and ``idle_timeout``.
    """

    __slots__ = ("task", "last_event", "got_first", "first_deadline", "idle_timeout", "attempt_deadline",
                 "total_deadline", "expired", "keepalive_interval", "last_write", "send_keepalive")

    def __init__(self, now: float, total_timeout: float | None, keepalive_interval: float | None = None,
                 send_keepalive: Callable[[], Any] | None = None, loop: asyncio.AbstractEventLoop | None = None
                 ) -> None:
        # With the loop given, no get_running_loop() (a getpid system call on Python 3.11).
        self.task = asyncio.current_task(loop)
        self.last_event = now
        self.last_write = now
        self.got_first = False
        self.first_deadline: float | None = None
        self.idle_timeout: float | None = None
        self.attempt_deadline: float | None = None
        self.total_deadline = now + total_timeout if total_timeout else None
        self.expired: str | None = None
        self.keepalive_interval = keepalive_interval
        self.send_keepalive = send_keepalive

    def attempt(self, now: float, first_token_timeout: float | None, idle_timeout: float | None,
                attempt_timeout: float | None) -> None:
        """Start the deadlines of one upstream attempt."""
        self.got_first = False
        self.first_deadline = now + first_token_timeout if first_token_timeout else None
        self.idle_timeout = idle_timeout
        self.attempt_deadline = now + attempt_timeout if attempt_timeout else None
        self.last_event = now
        self.expired = None

    def pause(self) -> None:
        """Between attempts (backoff): only the request deadline and keepalives apply."""
        self.first_deadline = self.attempt_deadline = self.idle_timeout = None
        self.got_first = False

    def check(self, now: float) -> None:
        if self.expired is not None:
            return
        kind = None
        if self.total_deadline is not None and now >= self.total_deadline:
            kind = "total"
        elif self.attempt_deadline is not None and now >= self.attempt_deadline:
            kind = "attempt"
        elif not self.got_first:
            if self.first_deadline is not None and now >= self.first_deadline:
                kind = "first_token"
        elif self.idle_timeout is not None and now - self.last_event >= self.idle_timeout:
            kind = "idle"
        if kind is not None:
            self.expired = kind
            if self.task is not None:
                self.task.cancel()
            return
        if self.keepalive_interval is not None and now - self.last_write >= self.keepalive_interval:
            self.last_write = now
            self.send_keepalive()  # type: ignore[misc]


class Watchdog:
    def __init__(self, tick: float) -> None:
        self.tick = tick
        self.guards: set[Guard] = set()
        self.lag = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="ssegate-watchdog")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        tick = self.tick
        while True:
            before = loop.time()
            await asyncio.sleep(tick)
            now = loop.time()
            #: How late this tick woke up: a loop blocked by CPU work or a sync call shows here (liveness).
            self.lag = max(0.0, now - before - tick)
            if self.guards:
                for guard in tuple(self.guards):
                    guard.check(now)
