"""Circuit breaker per provider: closed → open after consecutive failures → half-open trials → closed.

Settings follow the seed's ``circuit_breaker`` block: ``failure_threshold`` consecutive failures open the
circuit; after ``recovery_timeout`` seconds it is half-open and lets at most ``half_open_max_calls`` trial calls
run at once; a trial success closes it, a trial failure opens it again for another ``recovery_timeout``.

A 429 is no failure: a rate limit is not an outage, and providers limit per model. With ``Retry-After`` it
cools that model of the provider down (``cooldown.py``); the circuit is untouched.
"""
from __future__ import annotations

import time
from typing import Callable

import structlog

from .config.schema import CircuitBreakerConfig

__all__ = ["CircuitBreaker", "CLOSED", "OPEN", "HALF_OPEN"]

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
log = structlog.get_logger("ssegate.breaker")


class CircuitBreaker:
    __slots__ = ("name", "config", "state", "failures", "opened_at", "open_for", "trials", "clock", "listeners")

    def __init__(self, name: str, config: CircuitBreakerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.config = config
        self.state = CLOSED
        self.failures = 0
        self.opened_at = 0.0
        #: How long the current opening lasts (``recovery_timeout``).
        self.open_for = config.recovery_timeout
        self.trials = 0
        self.clock = clock
        #: Called as ``listener(provider_name, old_state, new_state)`` on every change (metrics, health).
        self.listeners: list[Callable[[str, str, str], None]] = []

    def _set(self, state: str) -> None:
        old, self.state = self.state, state
        if old != state:
            log.warning("circuit_state_changed", provider=self.name, old=old, new=state, failures=self.failures)
            for listener in self.listeners:
                listener(self.name, old, state)

    def current(self) -> str:
        """The state now (an open circuit past its recovery timeout reads as half-open)."""
        if self.state == OPEN and self.clock() - self.opened_at >= self.open_for:
            return HALF_OPEN
        return self.state

    def retry_in(self) -> float:
        """Seconds until an open circuit lets a trial call through (0 when it would now)."""
        if self.state != OPEN:
            return 0.0
        return max(0.0, self.opened_at + self.open_for - self.clock())

    def acquire(self) -> bool:
        """May a call go to this provider now? A True in half-open state takes a trial slot: the caller
        must then report :meth:`success` or :meth:`failure` (or :meth:`release` if it never called)."""
        if not self.config.enabled or self.state == CLOSED:
            return True
        if self.state == OPEN:
            if self.clock() - self.opened_at < self.open_for:
                return False
            self._set(HALF_OPEN)
            self.trials = 0
        if self.trials >= self.config.half_open_max_calls:
            return False
        self.trials += 1
        return True

    def release(self) -> None:
        if self.state == HALF_OPEN and self.trials > 0:
            self.trials -= 1

    def success(self) -> None:
        self.failures = 0
        if self.state != CLOSED:
            self.trials = 0
            self._set(CLOSED)

    def failure(self) -> None:
        if not self.config.enabled:
            return
        self.failures += 1
        if self.state == HALF_OPEN or (self.state == CLOSED and self.failures >= self.config.failure_threshold):
            self._open(self.config.recovery_timeout)

    def _open(self, seconds: float) -> None:
        self.opened_at = self.clock()
        self.open_for = seconds
        self.trials = 0
        self._set(OPEN)
