"""One timer for all live requests: first-token, idle and total deadlines, and stream keepalives.

Arming a timer per chunk (``asyncio.wait_for`` around every read) costs more than relaying the chunk. Instead
each live request registers a :class:`Guard`; the relay only stamps ``guard.last_event`` per upstream read, and a
single timer wakes when the earliest guard could be due: the earliest deadline or keepalive any guard could reach
if nothing arrived from now on (a lower bound: reads only push a guard's deadlines later, so the timer never fires
late, only sometimes early, when it looks again). A guard past its deadline cancels its request's task (the relay
turns that into a timeout); an idle stream gets a ``: keepalive`` comment.

With no live request the timer is not armed at all: an idle gateway does not wake up. (A wake-up of an idle
process costs ~150 µs of CPU on a VM, more than relaying a whole short stream's worth of chunks; a fixed tick of
one second cost an idle gateway, and every slow stream, that much per second.)

Event-loop lag for the liveness probe is measured by :meth:`Watchdog.probe_lag` when asked, and by how late the
timer itself fires while requests are live.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable

__all__ = ["Watchdog", "Guard"]

_INF = float("inf")
#: How long a lateness the watchdog's own timer measured counts for the liveness probe (seconds).
LAG_MEMORY = 10.0


class Guard:
    """Deadlines and keepalive state of one live request (the relay owns it; the watchdog reads it).

    ``total_deadline`` is the request's deadline across all attempts; each attempt adds its own
    ``attempt_deadline`` (the provider's ``timeout``), ``first_deadline`` and ``idle_timeout``.
    """

    __slots__ = ("task", "last_event", "got_first", "first_deadline", "idle_timeout", "attempt_deadline",
                 "total_deadline", "expired", "keepalive_interval", "last_write", "send_keepalive", "watchdog",
                 "dropped")

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
        #: The watchdog this guard is registered with (:meth:`Watchdog.watch`), told of deadlines that move closer.
        self.watchdog: Watchdog | None = None
        #: The guard expired, so the watchdog's timer no longer counts it: :meth:`pause` must tell it again.
        self.dropped = False

    def attempt(self, now: float, first_token_timeout: float | None, idle_timeout: float | None,
                attempt_timeout: float | None) -> None:
        """Start the deadlines of one upstream attempt."""
        self.got_first = False
        self.idle_timeout = idle_timeout
        self.last_event = now
        self.expired = None
        # What this adds to next_due() is at least now + the shortest of the three (idle before the first token
        # stands in from now); the request deadline and keepalives the watchdog already counts.
        soonest = idle_timeout or _INF
        if first_token_timeout:
            self.first_deadline = now + first_token_timeout
            if first_token_timeout < soonest:
                soonest = first_token_timeout
        else:
            self.first_deadline = None
        if attempt_timeout:
            self.attempt_deadline = now + attempt_timeout
            if attempt_timeout < soonest:
                soonest = attempt_timeout
        else:
            self.attempt_deadline = None
        watchdog = self.watchdog
        if watchdog is not None and now + soonest < watchdog._wake_at:  # (the usual case under load: no call)
            watchdog.wake_by(self.next_due(now))

    def pause(self) -> None:
        """Between attempts (backoff): only the request deadline and keepalives apply. (Only later than the
        attempt's deadlines: the watchdog is told only when a timeout had dropped the guard from its count.)"""
        self.first_deadline = self.attempt_deadline = self.idle_timeout = None
        self.got_first = False
        if self.dropped and self.watchdog is not None:
            self.dropped = False
            self.watchdog.wake_by(self.next_due(self.last_event))

    def next_due(self, now: float) -> float | None:
        """The earliest time this guard could need the watchdog, if nothing arrived after ``now``: a deadline or a
        keepalive. Reads and writes only move it later. Before the first token the idle clock may start any
        moment, so ``now + idle_timeout`` stands in for it. None when nothing is due (expired, or no deadline)."""
        if self.expired is not None:
            return None
        due = _INF
        if self.total_deadline is not None:
            due = self.total_deadline
        if self.attempt_deadline is not None and self.attempt_deadline < due:
            due = self.attempt_deadline
        if self.got_first:
            if self.idle_timeout is not None and self.last_event + self.idle_timeout < due:
                due = self.last_event + self.idle_timeout
        else:
            if self.first_deadline is not None and self.first_deadline < due:
                due = self.first_deadline
            if self.idle_timeout is not None and now + self.idle_timeout < due:
                due = now + self.idle_timeout
        if self.keepalive_interval is not None and self.last_write + self.keepalive_interval < due:
            due = self.last_write + self.keepalive_interval
        return None if due == _INF else due

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
            self.dropped = True
            if self.task is not None:
                self.task.cancel()
            return
        if self.keepalive_interval is not None and now - self.last_write >= self.keepalive_interval:
            self.last_write = now
            self.send_keepalive()  # type: ignore[misc]


class Watchdog:
    """Checks the live requests' guards when the earliest of them could be due, never more often than every
    ``tick`` seconds (a quarter of the shortest configured interval), and not at all while none is live."""

    def __init__(self, tick: float) -> None:
        self.tick = tick
        self.guards: set[Guard] = set()
        #: The last lateness of the watchdog's timer (seconds) and when it was measured (loop time).
        self.lag = 0.0
        self.lag_at = -_INF
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._wake_at = _INF
        self._last_wake = -_INF

    def start(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            for guard in self.guards:
                self.wake_by(guard.next_due(self._loop.time()))

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._wake_at, self._loop = None, _INF, None

    @property
    def running(self) -> bool:
        return self._loop is not None

    def watch(self, guard: Guard) -> None:
        """Register a live request's guard (until :meth:`release`), before its first :meth:`Guard.attempt`."""
        self.guards.add(guard)
        guard.watchdog = self
        if self._loop is not None:
            # A new guard's next_due(): its request deadline or its first keepalive, whichever comes first.
            due = guard.total_deadline
            if guard.keepalive_interval is not None:
                keepalive = guard.last_write + guard.keepalive_interval
                if due is None or keepalive < due:
                    due = keepalive
            if due is not None and due < self._wake_at:
                self.wake_by(due)

    def release(self, guard: Guard) -> None:
        """The request ended. Its part of an armed timer is left to run out: it finds nothing to do, or others."""
        self.guards.discard(guard)
        guard.watchdog = None

    def wake_by(self, due: float | None) -> None:
        """Make sure the timer fires by ``due`` (loop time), or ``tick`` after the last wake-up if that is later."""
        if due is None or due >= self._wake_at or self._loop is None:
            return
        at = self._last_wake + self.tick
        if due > at:
            at = due
        if at >= self._wake_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._wake_at = at
        self._timer = self._loop.call_at(at, self._fire)

    def _fire(self) -> None:
        loop = self._loop
        if loop is None:
            return
        now, planned = loop.time(), self._wake_at
        #: How late the timer fired: a loop blocked by CPU work or a sync call shows here (liveness).
        self.lag, self.lag_at = max(0.0, now - planned), now
        if now < planned:  # run within the loop's clock resolution before its time: it is that time
            now = planned
        self._timer, self._wake_at, self._last_wake = None, _INF, now
        due = _INF
        for guard in tuple(self.guards):
            guard.check(now)
            at = guard.next_due(now)
            if at is not None and at < due:
                due = at
        if due != _INF:
            self.wake_by(due)

    def recent_lag(self, now: float) -> float:
        """The timer's last lateness if measured within :data:`LAG_MEMORY` seconds, else 0."""
        return self.lag if now - self.lag_at <= LAG_MEMORY else 0.0

    async def probe_lag(self) -> float:
        """Event-loop lag now: how long a callback queued at this moment waits to run, or the timer's recent
        lateness if that is larger. A loop that is blocked does not answer the probe at all, which the probe's
        own timeout catches; one that is congested shows here."""
        loop = asyncio.get_running_loop()
        queued = loop.time()
        done: asyncio.Future[None] = loop.create_future()
        loop.call_soon(done.set_result, None)
        await done
        now = loop.time()
        return max(now - queued, self.recent_lag(now))
