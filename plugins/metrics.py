"""Prometheus metrics and the JSON summary, recorded once per exchange in ``exchange_done``.

Per exchange this costs a handful of dict increments (see :class:`proxy.metrics.FastCounter`); the values reach
the aioprometheus collectors when ``/metrics`` is scraped. Label values are bounded: route, provider (from the
config), status, error kinds, and model names only for models that were actually routed (at most
``MAX_MODELS`` distinct, then ``other``).
"""
from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from proxy.tasks import stop_task
from proxy import Outcome, hookimpl
from proxy.breaker import CLOSED, HALF_OPEN, OPEN
from proxy.metrics import (
    LATENCY_BUCKETS, TOKEN_BUCKETS, FastCounter, FastHistogram, counter, gauge, histogram,
)

if TYPE_CHECKING:
    from proxy import Exchange
    from proxy.gateway import Gateway

__all__ = ["MetricsPlugin"]

MAX_MODELS = 200
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_CIRCUIT_VALUE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}
_ERROR_OUTCOMES = frozenset({Outcome.ERROR, Outcome.TIMEOUT})


def _process_start_time() -> float:
    """Unix time the process started: from /proc on Linux (field 22 of /proc/self/stat, in clock ticks after
    boot, plus ``btime`` of /proc/stat), else the time this module was first imported. Never the time a plugin
    instance was created: a config reload builds new instances, and ``process_start_time_seconds`` must not
    move then."""
    try:
        with open("/proc/self/stat") as f:
            stat = f.read()
        ticks = int(stat[stat.rindex(")") + 2:].split()[19])  # fields after "(comm)" start at field 3
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration, AttributeError):
        return time.time()


#: Set once per process, at import (plugins modules are imported once, whatever the number of reloads).
PROCESS_START = _process_start_time()


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    idx = min(len(values) - 1, max(0, int(round(q * (len(values) - 1)))))
    return values[idx]


class MetricsPlugin:
    def __init__(self) -> None:
        self._probe: asyncio.Task[None] | None = None
        self.gateway: "Gateway | None" = None
        self.models: set[str] = set()
        self.recent: deque[tuple[float, float, float | None, int, int, str | None, bool, bool | None]] = deque(
            maxlen=10000)

    # -- setup ------------------------------------------------------------------------------------------------
    @hookimpl
    def register_metrics(self, registry: Any) -> None:
        self.registry = registry
        self.requests = FastCounter(counter(registry, "ssegate_requests_total", "Requests answered."),
                                    ("route", "model", "provider", "status"))
        self.duration = FastHistogram(histogram(registry, "ssegate_request_duration_seconds",
                                                "Time from request to the last byte.", LATENCY_BUCKETS),
                                      ("route", "stream"))
        self.ttft = FastHistogram(histogram(registry, "ssegate_time_to_first_token_seconds",
                                            "Time from request to the first content byte sent.", LATENCY_BUCKETS),
                                  ("provider",))
        self.itl = FastHistogram(histogram(registry, "ssegate_inter_token_seconds",
                                           "Mean time between streamed events, per stream.", TOKEN_BUCKETS),
                                 ("provider",))
        self.tokens = FastCounter(counter(registry, "ssegate_tokens_total", "Tokens, as reported by upstreams."),
                                  ("type", "model", "provider", "tier"))
        self.upstream_errors = FastCounter(counter(registry, "ssegate_upstream_errors_total",
                                                   "Failed upstream attempts."), ("provider", "kind"))
        self.retries = FastCounter(counter(registry, "ssegate_retries_total", "Retries on the same provider."),
                                   ("provider",))
        self.fallbacks = FastCounter(counter(registry, "ssegate_fallbacks_total",
                                             "Requests answered by another route than the first."))
        self.cache_hits = FastCounter(counter(registry, "ssegate_cache_hits_total", "Cache hits."))
        self.cache_misses = FastCounter(counter(registry, "ssegate_cache_misses_total", "Cache misses."))
        self.ratelimited = FastCounter(counter(registry, "ssegate_ratelimited_total",
                                               "Requests refused by the gateway's rate limits."))
        self.flagged = FastCounter(counter(registry, "ssegate_moderation_flagged_total",
                                           "Requests or answers flagged by moderation."))
        self.overhead = FastHistogram(histogram(registry, "ssegate_overhead_seconds",
                                                "Time spent in the gateway itself (before the upstream call, and "
                                                "between the upstream's first event and the client's).",
                                                TOKEN_BUCKETS), ())
        self.active_streams = gauge(registry, "ssegate_active_streams", "Streams being relayed now.")
        self.in_flight = gauge(registry, "ssegate_requests_in_flight", "Requests in flight now.")
        self.circuit = gauge(registry, "ssegate_circuit_state",
                             "Circuit breaker per provider: 0 closed, 1 half-open, 2 open.")
        self.redis_up = gauge(registry, "ssegate_redis_up", "1 when the shared Redis answered its last ping.")
        self.process_cpu = counter(registry, "process_cpu_seconds_total", "User and system CPU time, seconds.")
        self.process_rss = gauge(registry, "process_resident_memory_bytes", "Resident memory, bytes.")
        self.process_fds = gauge(registry, "process_open_fds", "Open file descriptors.")
        self.process_start = gauge(registry, "process_start_time_seconds", "Start time, Unix seconds.")
        self._fast = (self.requests, self.duration, self.ttft, self.itl, self.tokens, self.upstream_errors,
                      self.retries, self.fallbacks, self.cache_hits, self.cache_misses, self.ratelimited,
                      self.flagged, self.overhead)

    @hookimpl
    def startup(self, gateway: "Gateway") -> None:
        self.gateway = gateway
        self.recent = deque(self.recent, maxlen=gateway.config.observability.summary_window)
        gateway.scrape_callbacks.append(self.sync)
        self.process_start.set({}, PROCESS_START)
        if gateway.config.redis.url:
            self._probe = asyncio.get_running_loop().create_task(self._redis_probe(), name="ssegate-redis-probe")

    @hookimpl
    async def shutdown(self, gateway: "Gateway") -> None:
        probe, self._probe = self._probe, None
        await stop_task(probe)

    async def _redis_probe(self, interval: float = 5.0) -> None:
        """Ping the shared Redis every few seconds, so ``ssegate_redis_up`` tells what the gateway sees."""
        gateway = self.gateway
        assert gateway is not None
        while True:
            try:
                await asyncio.wait_for(gateway.redis.ping(), gateway.config.redis.socket_timeout + 0.5)
                self.redis_up.set({}, 1)
            except Exception:  # any failure means down
                self.redis_up.set({}, 0)
            await asyncio.sleep(interval)

    def sync(self) -> None:
        """Hand the accumulated values to the collectors (called before each scrape)."""
        for fast in self._fast:
            fast.sync()
        self._process()
        gateway = self.gateway
        if gateway is not None:
            self.active_streams.set({}, gateway.active_streams)
            self.in_flight.set({}, gateway.in_flight)
            for name, breaker in gateway.breakers.items():
                self.circuit.set({"provider": name}, _CIRCUIT_VALUE[breaker.current()])

    def _process(self) -> None:
        times = os.times()
        self.process_cpu.set({}, times.user + times.system)
        try:
            with open("/proc/self/statm") as f:
                self.process_rss.set({}, int(f.read().split()[1]) * _PAGE)
            self.process_fds.set({}, len(os.listdir("/proc/self/fd")))
        except OSError:  # not Linux
            pass

    # -- per exchange ---------------------------------------------------------------------------------------
    def _model(self, exchange: "Exchange") -> str:
        model = exchange.upstream_model or exchange.model
        if not exchange.routes or model is None:
            return "unknown"
        if model not in self.models:
            if len(self.models) >= MAX_MODELS:
                return "other"
            self.models.add(model)
        return model

    @hookimpl
    def exchange_done(self, exchange: "Exchange") -> None:
        route = exchange.endpoint if exchange.ingress == "openai" else f"{exchange.endpoint}:{exchange.ingress}"
        provider = exchange.provider or "none"
        model = exchange.upstream_model or exchange.model
        if model not in self.models:  # includes None
            model = self._model(exchange)
        elif not exchange.routes:
            model = "unknown"
        status = exchange.status or 0
        self.requests.inc((route, model, provider, status))  # labels become strings at scrape time
        started, ended, first = exchange.started, exchange.ended, exchange.first_byte_at
        duration = 0.0 if ended is None else ended - started
        self.duration.observe((route, "true" if exchange.stream else "false"), duration)
        ttft = None if first is None else first - started
        if ttft is not None:
            self.ttft.observe((provider,), ttft)
            if exchange.stream and exchange.chunks_sent > 1 and exchange.ended is not None:
                self.itl.observe((provider,), (exchange.ended - exchange.first_byte_at) / (exchange.chunks_sent - 1))
        usage = exchange.usage
        if usage is not None:
            principal = exchange.principal
            tier = (principal.tier or "none") if principal is not None else "anonymous"
            self.tokens.inc(("prompt", model, provider, tier), usage.prompt_tokens)
            self.tokens.inc(("completion", model, provider, tier), usage.completion_tokens)
        attempts = exchange.attempts
        if attempts:
            previous = None
            for attempt in attempts:
                kind = attempt.get("error")
                if kind is not None:
                    self.upstream_errors.inc((attempt["provider"], kind))
                if attempt["provider"] == previous:
                    self.retries.inc((attempt["provider"],))
                previous = attempt["provider"]
            if exchange.outcome == Outcome.OK and attempts[0]["provider"] != provider:
                self.fallbacks.inc()
        cache = exchange.response_headers.get("x-cache")
        if cache == "HIT":
            self.cache_hits.inc()
        elif cache == "MISS":
            self.cache_misses.inc()
        tags = exchange.tags
        if tags:
            if "ratelimited" in tags:
                self.ratelimited.inc()
            if "moderation_flagged" in tags:
                self.flagged.inc()
        if exchange.upstream_sent_at is not None:
            overhead = exchange.upstream_sent_at - exchange.started
            if exchange.upstream_first_at is not None and exchange.first_byte_at is not None:
                overhead += max(0.0, exchange.first_byte_at - exchange.upstream_first_at)
            self.overhead.observe((), overhead)
        error_class = None
        outcome = exchange.outcome
        if status >= 400 or outcome in _ERROR_OUTCOMES:
            error_class = "client" if 400 <= status < 500 else "upstream" if exchange.attempts else "gateway"
            if outcome == Outcome.TIMEOUT:
                error_class = "timeout"
            elif outcome == Outcome.CLIENT_DISCONNECT:
                error_class = "client_disconnect"
        completion = usage.completion_tokens if usage is not None else 0
        self.recent.append((time.time(), duration, ttft, completion, status, error_class, exchange.stream,
                            None if cache is None else cache == "HIT"))

    # -- summary ----------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """The FakeAI-style JSON summary over the recent window."""
        recent = list(self.recent)
        durations = [r[1] for r in recent]
        ttfts = [r[2] for r in recent if r[2] is not None]
        errors: dict[str, int] = {}
        for r in recent:
            if r[5] is not None:
                errors[r[5]] = errors.get(r[5], 0) + 1
        tokens = sum(r[3] for r in recent)
        busy = sum(r[1] for r in recent if r[3])
        cached = [r[7] for r in recent if r[7] is not None]
        window = (recent[-1][0] - recent[0][0]) if len(recent) > 1 else 0.0
        gateway = self.gateway
        return {
            "window": {"requests": len(recent), "seconds": round(window, 3)},
            "requests": {"total": len(recent), "per_second": round(len(recent) / window, 3) if window else None,
                         "streams": sum(1 for r in recent if r[6])},
            "latency_seconds": {"p50": _percentile(durations, 0.5), "p95": _percentile(durations, 0.95),
                                "p99": _percentile(durations, 0.99)},
            "ttft_seconds": {"p50": _percentile(ttfts, 0.5), "p95": _percentile(ttfts, 0.95),
                             "p99": _percentile(ttfts, 0.99)},
            "tokens": {"completion": tokens, "per_second": round(tokens / busy, 3) if busy else None},
            "errors": {"total": sum(errors.values()), "rate": round(sum(errors.values()) / len(recent), 4)
                       if recent else 0.0, "by_class": errors},
            "active_streams": gateway.active_streams if gateway is not None else 0,
            "cache": {"hits": sum(cached), "lookups": len(cached),
                      "hit_rate": round(sum(cached) / len(cached), 4) if cached else None},
        }
