"""Cooldowns of (provider, model) pairs: a provider that answers 429 with ``Retry-After`` has said that this
model takes no calls for that long.

Providers limit requests and tokens per model (OpenAI, Azure deployments, Anthropic), so a 429 says nothing
about the provider's other models, and nothing about its health: it neither counts against the circuit nor
opens it. The forwarder skips a cooling pair (the next route answers, or the client gets a 429 with the
``Retry-After`` left), and asks it again once the pause is over.

A pause lasts what the provider asked, at most the provider circuit's ``recovery_timeout`` (a provider that
asks for an hour is asked again sooner; it may have capacity again). A provider whose circuit breaker is
disabled is never skipped, so it gets no cooldown either.
"""
from __future__ import annotations

import time
from typing import Callable

__all__ = ["Cooldowns"]

#: Past this many pairs, a new cooldown first drops the ones that are over (the pairs are bounded by the
#: configured models, but a wildcard provider takes any model name a client sends).
_PURGE_ABOVE = 1024


class Cooldowns:
    """The pairs cooling down, each with the monotonic time its pause ends."""

    __slots__ = ("until", "clock")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.until: dict[tuple[str, str], float] = {}
        self.clock = clock

    def start(self, provider: str, model: str, seconds: float) -> None:
        """Rest ``model`` of ``provider`` for ``seconds`` (a longer pause already running is kept)."""
        if seconds <= 0:
            return
        now = self.clock()
        key = (provider, model)
        if self.until.get(key, 0.0) >= now + seconds:
            return
        if len(self.until) >= _PURGE_ABOVE:
            self.until = {k: t for k, t in self.until.items() if t > now}
        self.until[key] = now + seconds

    def left(self, provider: str, model: str) -> float:
        """Seconds until ``model`` of ``provider`` may be asked again (0 when it may now)."""
        if not self.until:  # the common case: nothing is cooling, one truth test per attempt
            return 0.0
        end = self.until.get((provider, model))
        if end is None:
            return 0.0
        left = end - self.clock()
        if left <= 0:
            del self.until[(provider, model)]
            return 0.0
        return left

    def of(self, provider: str) -> dict[str, float]:
        """The models of ``provider`` cooling now, with the seconds left (for ``/health``)."""
        now = self.clock()
        return {model: round(end - now, 3) for (name, model), end in self.until.items()
                if name == provider and end > now}
