"""The default router: candidates for a model are the enabled providers serving it, by ascending priority.

Providers declare the models they serve (``models: ["gpt-4*", "claude-3-haiku"]``, ``*`` wildcards allowed).
A request's model is matched once per distinct name; the result is cached for the life of this config.
"""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from proxy import Route, hookimpl

if TYPE_CHECKING:
    from proxy import Exchange
    from proxy.gateway import Gateway

__all__ = ["RouterPlugin"]

_MAX_CACHED_MODELS = 4096


class RouterPlugin:
    def __init__(self) -> None:
        self._providers: list = []
        self._cache: dict[str, tuple[str, ...]] = {}

    @hookimpl
    def startup(self, gateway: "Gateway") -> None:
        enabled = [p.config for p in gateway.providers.values() if p.config.enabled]
        self._providers = sorted(enabled, key=lambda c: c.priority)
        self._cache.clear()

    def providers_for(self, model: str) -> tuple[str, ...]:
        names = self._cache.get(model)
        if names is None:
            names = tuple(c.name for c in self._providers if any(fnmatchcase(model, pat) for pat in c.models))
            if len(self._cache) >= _MAX_CACHED_MODELS:
                self._cache.clear()
            self._cache[model] = names
        return names

    @hookimpl(trylast=True)
    def select_route(self, exchange: "Exchange") -> list[Route]:
        model = exchange.model or ""
        return [Route(name, model) for name in self.providers_for(model)]
