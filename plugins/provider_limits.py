"""Outbound rate limits: the requests a minute the gateway sends each provider (``providers[].rate_limit``).

What they protect is the upstream's own quota: the requests a minute of an API key at OpenAI or Anthropic, the
capacity of a self-hosted server. Every attempt on a provider takes one request from that provider's token bucket
(capacity ``rate_limit``, refilled at ``rate_limit`` a minute: the arithmetic of the ``ratelimit`` plugin, in
``_ratelimit_core``). At the limit the attempt raises :class:`proxy.RouteDeclined`: nothing is sent, and the
gateway tries the request's next route, so a provider at its quota fails over to the next priority as one whose
circuit is open does. A request that no route takes gets 429 ``rate_limit_exceeded`` with ``Retry-After``.

Where the buckets live (``backend``): in Redis when ``redis.url`` is set (every replica takes from one bucket per
provider: one ``EVALSHA`` per attempt), otherwise in this process's memory, kept across config reloads. When
Redis cannot be reached, this process's own bucket holds the limit until it can (logged once per outage): a limit
that guards a quota should neither vanish nor stop all traffic because Redis is down for a moment.

The gateway adds this plugin to the pipeline when a provider sets ``rate_limit`` and the pipeline does not list
it. It implements only ``startup`` and ``upstream_request``: a pipeline without it pays nothing.
"""
from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import attrs
import structlog

from proxy import RouteDeclined, hookimpl

from ._ratelimit_core import UNIT, BackendError, MemoryBackend, RedisBackend
from ._validators import one_of

if TYPE_CHECKING:
    from proxy import Exchange, UpstreamRequest
    from proxy.gateway import Gateway

__all__ = ["ProviderLimitsPlugin", "ProviderLimitsConfig", "BACKENDS"]

log = structlog.get_logger("ssegate.provider_limits")

BACKENDS = ("auto", "memory", "redis")
#: The cost of one attempt, in bucket units.
_ONE_REQUEST = (UNIT,)
#: Seconds between tries of a Redis that failed (attempts meanwhile take from the local bucket).
REDIS_RETRY_INTERVAL = 0.5


@attrs.frozen
class ProviderLimitsConfig:
    backend: str = attrs.field(default="auto", validator=one_of(*BACKENDS), metadata={
        "doc": "`auto` (Redis when `redis.url` is set, else this process), `memory` (each process its own "
               "buckets) or `redis` (needs `redis.url`)."})
    key_prefix: str = attrs.field(default="ssegate:pl:", metadata={"doc": "Prefix of the Redis keys."})


class ProviderLimitsPlugin:
    """Holds each provider to its ``rate_limit`` (requests a minute), passing over a provider at its limit."""

    Config = ProviderLimitsConfig

    def __init__(self, config: ProviderLimitsConfig | None = None) -> None:
        self.config = config or ProviderLimitsConfig()
        #: provider name -> (keys, capacities, rates) of its bucket
        self.plans: dict[str, tuple[tuple[str], tuple[int], tuple[int]]] = {}
        self.local = MemoryBackend()
        self.shared: RedisBackend | None = None
        self._retry_shared_at = 0.0
        self._shared_down_since: float | None = None

    @hookimpl
    async def startup(self, gateway: "Gateway") -> None:
        # The local buckets outlive config reloads: a reload must not hand every provider a fresh minute.
        self.local = gateway.process_state.setdefault("provider_limits.memory", self.local)
        backend, url = self.config.backend, gateway.config.redis.url
        if backend == "redis" or (backend == "auto" and url):
            if not url:
                raise ValueError("the provider_limits backend 'redis' needs the redis.url setting")
            self.shared = RedisBackend()
            await self.shared.start(gateway)
            try:
                await self.shared.load_script()
            except BackendError as exc:  # serve anyway, on the local buckets, and try Redis again later
                self._shared_failed(exc)
        prefix = self.config.key_prefix
        for provider in gateway.config.providers:
            if provider.rate_limit is not None:
                # (the braces: a Redis Cluster hash tag, as the ratelimit plugin's keys have)
                self.plans[provider.name] = ((f"{prefix}{{{provider.name}}}:r",), (provider.rate_limit * UNIT,),
                                             (provider.rate_limit,))

    @hookimpl
    async def upstream_request(self, exchange: "Exchange", request: "UpstreamRequest") -> None:
        name = request.route.provider
        plan = self.plans.get(name)
        if plan is None:
            return
        keys, caps, rates = plan
        shared = self.shared
        if shared is not None and time.monotonic() >= self._retry_shared_at:
            try:
                ok, _, levels = await shared.acquire(keys, caps, rates, _ONE_REQUEST)
            except BackendError as exc:
                self._shared_failed(exc)
                ok, _, levels = self.local.run(keys, caps, rates, _ONE_REQUEST, True)
            else:
                if self._shared_down_since is not None:
                    self._shared_recovered()
        else:
            ok, _, levels = self.local.run(keys, caps, rates, _ONE_REQUEST, True)
        if ok:
            return
        rate = rates[0]
        wait_ms = -(-(UNIT - levels[0]) // rate)  # until the bucket holds one request again
        raise RouteDeclined(
            429, f"Provider {name!r} is at its rate limit of {rate} requests per minute (the gateway's "
                 f"providers[].rate_limit), and no other route could take the request. Retry in "
                 f"{math.ceil(wait_ms / 1000)} s.",
            reason="provider_rate_limit", code="rate_limit_exceeded",
            headers={"Retry-After": str(max(1, math.ceil(wait_ms / 1000))), "retry-after-ms": str(wait_ms)})

    def _shared_failed(self, exc: BackendError) -> None:
        self._retry_shared_at = time.monotonic() + REDIS_RETRY_INTERVAL
        if self._shared_down_since is None:
            self._shared_down_since = time.monotonic()
            log.warning("provider_limits_backend_failed", backend="redis", error=str(exc),
                        fallback="each process holds the limits on its own until Redis answers")

    def _shared_recovered(self) -> None:
        down = time.monotonic() - (self._shared_down_since or 0.0)
        self._shared_down_since = None
        log.info("provider_limits_backend_recovered", backend="redis", down_seconds=round(down, 3))
