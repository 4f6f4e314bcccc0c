"""The default router: which providers answer a model, and in which order to try them.

Candidates for a requested model, in this order of precedence:

1. an alias (``aliases: {fast: [local/gpt-4o-mini, anthropic/claude-3-haiku]}``): its targets, each
   ``provider/model`` (that provider, that model) or a bare model name (every provider serving it);
2. ``provider/model`` naming a configured provider directly (unless a provider lists that whole name as a model:
   ``openai/gpt-oss-20b`` from vLLM);
3. every enabled provider whose ``models`` patterns match (``*`` wildcards, ``gpt-4*``), less those whose upstream's
   own model list (``/v1/models`` discovery) is known and lacks the model, when others remain.

The first ``groups`` entry whose ``models`` patterns match the requested name chooses the strategy and the
mid-stream failure policy; otherwise the top-level ``strategy`` and ``on_midstream_failure`` apply.
Strategies: ``priority`` (ascending provider priority; an alias keeps its written order), ``weighted``
(random order drawn by provider ``weight``), ``least_busy`` (fewest requests in flight first) and ``latency``
(lowest moving average of time to first token first; unmeasured providers are tried first, to measure them).
Ties fall back to priority. Providers whose circuit is open are skipped by the gateway, not here.
"""
from __future__ import annotations

import random
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

import attrs

from proxy import Route, hookimpl
from proxy.upstream import DISCOVERY_GENERATION

from ._validators import one_of

if TYPE_CHECKING:
    from proxy import Exchange
    from proxy.gateway import Gateway
    from proxy.upstream import Provider

__all__ = ["RouterPlugin", "STRATEGIES"]

STRATEGIES = ("priority", "weighted", "least_busy", "latency")
_MIDSTREAM = ("error", "continue")
_MAX_CACHED_MODELS = 4096


@attrs.frozen
class ModelGroup:
    models: tuple[str, ...] = attrs.field(metadata={"doc": "Requested model names or aliases (wildcards allowed)."})
    strategy: str = attrs.field(default="priority", validator=one_of(*STRATEGIES),
                                metadata={"doc": "priority, weighted, least_busy or latency."})
    on_midstream_failure: str = attrs.field(default="error", validator=one_of(*_MIDSTREAM),
                                            metadata={"doc": "error or continue."})


@attrs.frozen
class RouterConfig:
    aliases: dict[str, tuple[str, ...]] = attrs.field(
        factory=dict, metadata={"doc": "Model name -> targets, each `provider/model` or a model name."})
    groups: tuple[ModelGroup, ...] = attrs.field(default=(), metadata={"doc": "Per model group settings."})
    strategy: str = attrs.field(default="priority", validator=one_of(*STRATEGIES),
                                metadata={"doc": "Strategy outside any group."})
    on_midstream_failure: str = attrs.field(default="error", validator=one_of(*_MIDSTREAM),
                                            metadata={"doc": "Mid-stream failure policy outside any group."})


class _Plan:
    """The cached routing decision for one requested model name (strategy applied per request)."""

    __slots__ = ("candidates", "strategy", "midstream", "explicit_order")

    def __init__(self, candidates: list[tuple["Provider", str]], strategy: str, midstream: str,
                 explicit_order: bool) -> None:
        self.candidates = candidates
        self.strategy = strategy
        self.midstream = midstream
        self.explicit_order = explicit_order


class RouterPlugin:
    Config = RouterConfig

    def __init__(self, config: RouterConfig | None = None) -> None:
        self.config = config or RouterConfig()
        self._providers: list["Provider"] = []
        self._by_name: dict[str, "Provider"] = {}
        self._plans: dict[str, _Plan] = {}
        self._generation = DISCOVERY_GENERATION[0]
        self._rng = random.Random()

    @hookimpl
    def startup(self, gateway: "Gateway") -> None:
        enabled = [p for p in gateway.providers.values() if p.config.enabled]
        self._providers = sorted(enabled, key=lambda p: p.config.priority)
        self._by_name = {p.name: p for p in self._providers}
        self._plans.clear()
        unknown = [t for targets in self.config.aliases.values() for t in targets
                   if "/" in t and t.split("/", 1)[0] not in gateway.providers]
        if unknown:
            raise ValueError(f"router aliases name unknown providers: {', '.join(unknown)}")

    def _serving(self, model: str) -> list[tuple["Provider", str]]:
        """The enabled providers whose ``models`` match ``model``, less those whose upstream listed its models
        (``/v1/models`` discovery) without it: a ``models: ["*"]`` vLLM does not get the requests for the model an
        Ollama beside it serves. When that leaves none, every match is kept (the list may be stale)."""
        matching = [p for p in self._providers if any(fnmatchcase(model, pat) for pat in p.config.models)]
        if len(matching) > 1:
            known = [p for p in matching if p.knows(model) is not False]
            matching = known or matching
        return [(p, model) for p in matching]

    def _listed_by_name(self, model: str) -> bool:
        """Whether some provider names ``model`` itself (listed, or discovered): then a ``provider/model``-looking
        name such as ``openai/gpt-oss-20b`` (vLLM's, Hugging Face's) is that model, not model ``gpt-oss-20b`` of a
        provider named ``openai``."""
        return any(p.knows(model) for p in self._providers)

    def _plan(self, model: str) -> _Plan:
        if self._generation != DISCOVERY_GENERATION[0]:  # an upstream's model list changed: plan again
            self._generation = DISCOVERY_GENERATION[0]
            self._plans.clear()
        plan = self._plans.get(model)
        if plan is not None:
            return plan
        explicit = False
        targets = self.config.aliases.get(model)
        if targets is not None:
            explicit = True
            candidates: list[tuple["Provider", str]] = []
            for target in targets:
                name, sep, target_model = target.partition("/")
                if sep and name in self._by_name:
                    candidates.append((self._by_name[name], target_model))
                elif not sep:
                    candidates.extend(self._serving(target))
        else:
            name, sep, rest = model.partition("/")
            if sep and name in self._by_name and not self._listed_by_name(model):
                candidates = [(self._by_name[name], rest)]
            else:
                candidates = self._serving(model)
        seen: set[tuple[str, str]] = set()
        unique = []
        for provider, target_model in candidates:
            if (provider.name, target_model) not in seen:
                seen.add((provider.name, target_model))
                unique.append((provider, target_model))
        strategy, midstream = self.config.strategy, self.config.on_midstream_failure
        for group in self.config.groups:
            if any(fnmatchcase(model, pat) for pat in group.models):
                strategy, midstream = group.strategy, group.on_midstream_failure
                break
        plan = _Plan(unique, strategy, midstream, explicit)
        if len(self._plans) >= _MAX_CACHED_MODELS:
            self._plans.clear()
        self._plans[model] = plan
        return plan

    def order(self, plan: _Plan) -> list[tuple["Provider", str]]:
        candidates = plan.candidates
        if len(candidates) < 2:
            return candidates
        strategy = plan.strategy
        if strategy == "priority":
            return candidates if plan.explicit_order else sorted(candidates, key=lambda c: c[0].config.priority)
        if strategy == "least_busy":
            return sorted(candidates, key=lambda c: (c[0].in_flight, c[0].config.priority))
        if strategy == "latency":
            return sorted(candidates, key=lambda c: (c[0].ttft_ewma or 0.0, c[0].config.priority))
        # weighted: draw without replacement, each pick proportional to weight
        pool = list(candidates)
        ordered = []
        while pool:
            total = sum(max(c[0].config.weight, 0.0) for c in pool)
            pick = self._rng.uniform(0, total) if total > 0 else 0.0
            for i, c in enumerate(pool):
                pick -= max(c[0].config.weight, 0.0)
                if pick <= 0 or i == len(pool) - 1:
                    ordered.append(pool.pop(i))
                    break
        return ordered

    @hookimpl
    def select_route(self, exchange: "Exchange") -> list[Route]:
        plan = self._plan(exchange.model or "")
        exchange.on_midstream_failure = plan.midstream
        candidates = plan.candidates
        if len(candidates) == 1:  # nothing to order
            provider, model = candidates[0]
            return [Route(provider.name, model)]
        return [Route(provider.name, model) for provider, model in self.order(plan)]
