"""Prometheus metrics and the JSON summary, recorded once per exchange in ``exchange_done``.

``exchange_done`` only appends one tuple per exchange; the tuples are folded into plain dict series in batches
(every :data:`FOLD_EVERY` exchanges, and before each scrape or summary), one loop with no call per value, and
the values reach the aioprometheus collectors when ``/metrics`` is scraped (see
:class:`proxy.metrics.FastCounter`). Label values are bounded: route, provider (from the config), status, error
kinds, and model names only for models an upstream answered (at most ``MAX_MODELS`` distinct; ``other`` beyond,
and for a model not answered yet). The series belong to the process and survive config reloads.
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


def error_class(status: int, outcome: str | None, tried: bool) -> str | None:
    """The summary's error class of one exchange (None: not an error): ``client`` (4xx), ``upstream`` (a failure
    after an upstream was tried), ``gateway`` (one before), ``timeout``, ``client_disconnect``."""
    if status < 400 and outcome not in _ERROR_OUTCOMES:
        return None
    if outcome == Outcome.TIMEOUT:
        return "timeout"
    if outcome == Outcome.CLIENT_DISCONNECT:
        return "client_disconnect"
    return "client" if 400 <= status < 500 else "upstream" if tried else "gateway"


def _end_of(record: tuple[Any, ...]) -> float:
    """When a record's exchange ended (monotonic; when it started, for one that never got an end)."""
    return record[9] if record[9] is not None else record[7]


#: Records waiting to be folded into the series: folded when this many wait, and before every scrape or summary.
FOLD_EVERY = 256


class Series:
    """The process's metric series, the recent window of the summary, and the records not folded in yet.

    One per process: a config reload builds a new plugin instance, which adopts the Series of the one before (a
    counter must never go back), and exchanges still finishing on the old Gateway record into the same one.
    """

    def __init__(self, registry: Any) -> None:
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
        self.fast = (self.requests, self.duration, self.ttft, self.itl, self.tokens, self.upstream_errors,
                     self.retries, self.fallbacks, self.cache_hits, self.cache_misses, self.ratelimited,
                     self.flagged, self.overhead)
        #: Model label values seen so far (bounded by MAX_MODELS).
        self.models: set[str] = set()
        #: The last exchanges' records as ``exchange_done`` made them (the summary reads them when asked: nothing
        #: per exchange is computed or allocated for it).
        self.recent: deque[tuple[Any, ...]] = deque(maxlen=10000)
        #: Exchanges recorded by ``exchange_done`` and not folded yet (see :data:`FOLD_EVERY`).
        self.pending: list[tuple[Any, ...]] = []

    def sync(self) -> None:
        """Fold what is pending, then hand the series to the collectors (before each scrape)."""
        self.fold()
        for fast in self.fast:
            fast.sync()

    def model_label(self, model: str | None, routed: bool, answered: bool) -> str:
        """The ``model`` label of a model not labelled yet: it takes one of the ``MAX_MODELS`` slots only once an
        upstream answered it (``answered``), so names clients make up (a provider with ``models: ["*"]`` routes
        them all, and the upstream answers 404) cannot fill the slots and push real models into ``other``."""
        if not routed or model is None:
            return "unknown"
        if model not in self.models:
            if not answered or len(self.models) >= MAX_MODELS:
                return "other"
            self.models.add(model)
        return model

    def fold(self) -> None:
        """Turn the pending records into series values and summary entries: one loop over the records, the
        histogram values gathered per series and observed in batches (see ``FastHistogram.observe_many``)."""
        pending = self.pending
        if not pending:
            return
        records = pending.copy()
        pending.clear()
        models = self.models
        requests, tokens = self.requests.values, self.tokens.values
        durations: dict[tuple[str, str], list[float]] = {}
        ttfts: dict[tuple[str], list[float]] = {}
        itls: dict[tuple[str], list[float]] = {}
        overheads: list[float] = []
        fallbacks = cache_hits = cache_misses = ratelimited = flagged = 0
        for (endpoint, ingress, model, routed, provider, status, stream, started, first, ended, chunks, prompt,
             completion, tier, tried, attempts, cache, tags, overhead, outcome) in records:
            route = endpoint if ingress == "openai" else f"{endpoint}:{ingress}"
            if model not in models:  # includes None
                model = self.model_label(model, routed, status < 400 and outcome != Outcome.REJECTED)
            elif not routed:
                model = "unknown"
            key = (route, model, provider, status)  # labels become strings at scrape time
            requests[key] = requests.get(key, 0) + 1
            took = 0.0 if ended is None else ended - started
            key = (route, "true" if stream else "false")
            values = durations.get(key)
            if values is None:
                values = durations[key] = []
            values.append(took)
            ttft = None
            if first is not None:
                ttft = first - started
                key = (provider,)
                values = ttfts.get(key)
                if values is None:
                    values = ttfts[key] = []
                values.append(ttft)
                if stream and chunks > 1 and ended is not None:
                    itls.setdefault(key, []).append((ended - first) / (chunks - 1))
            if prompt is not None:
                key = ("prompt", model, provider, tier)
                tokens[key] = tokens.get(key, 0) + prompt
                key = ("completion", model, provider, tier)
                tokens[key] = tokens.get(key, 0) + completion
            if attempts is not None:  # retries, errors or fallbacks (None: one clean attempt)
                fallbacks += self._count_attempts(attempts, provider, outcome)
            if cache is not None:
                if cache == "HIT":
                    cache_hits += 1
                elif cache == "MISS":
                    cache_misses += 1
            if tags is not None:
                if "ratelimited" in tags:
                    ratelimited += 1
                if "moderation_flagged" in tags:
                    flagged += 1
            if overhead is not None:
                overheads.append(overhead)
        self.recent.extend(records)
        for series, batches in ((self.duration, durations), (self.ttft, ttfts), (self.itl, itls),
                                (self.overhead, {(): overheads} if overheads else {})):
            for key, values in batches.items():
                series.observe_many(key, values)
        for fast, count in ((self.fallbacks, fallbacks), (self.cache_hits, cache_hits),
                            (self.cache_misses, cache_misses), (self.ratelimited, ratelimited),
                            (self.flagged, flagged)):
            if count:
                fast.inc((), count)

    def _count_attempts(self, attempts: list[dict[str, Any]], provider: str, outcome: str | None) -> int:
        """Count upstream errors and retries of one exchange; 1 if it was answered by a fallback route."""
        errors, retries = self.upstream_errors.values, self.retries.values
        previous = None
        for attempt in attempts:
            kind = attempt.get("error")
            name = attempt["provider"]
            if kind is not None:
                key = (name, kind)
                errors[key] = errors.get(key, 0) + 1
            if name == previous:
                retries[(name,)] = retries.get((name,), 0) + 1
            previous = name
        return 1 if outcome == Outcome.OK and attempts[0]["provider"] != provider else 0


class MetricsPlugin:
    def __init__(self) -> None:
        self._probe: asyncio.Task[None] | None = None
        self.gateway: "Gateway | None" = None

    # -- setup ------------------------------------------------------------------------------------------------
    @hookimpl
    def register_metrics(self, registry: Any) -> None:
        self.registry = registry
        self.series = Series(registry)
        self.active_streams = gauge(registry, "ssegate_active_streams", "Streams being relayed now.")
        self.in_flight = gauge(registry, "ssegate_requests_in_flight", "Requests in flight now.")
        self.circuit = gauge(registry, "ssegate_circuit_state",
                             "Circuit breaker per provider: 0 closed, 1 half-open, 2 open.")
        self.redis_up = gauge(registry, "ssegate_redis_up", "1 when the shared Redis answered its last ping.")
        self.process_cpu = counter(registry, "process_cpu_seconds_total", "User and system CPU time, seconds.")
        self.process_rss = gauge(registry, "process_resident_memory_bytes", "Resident memory, bytes.")
        self.process_fds = gauge(registry, "process_open_fds", "Open file descriptors.")
        self.process_start = gauge(registry, "process_start_time_seconds", "Start time, Unix seconds.")

    @hookimpl
    def startup(self, gateway: "Gateway") -> None:
        self.gateway = gateway
        before = gateway.process_state.get("metrics")
        if isinstance(before, Series) and before.registry is self.registry:
            self.series = before  # a reload: counters carry on from where they were
        gateway.process_state["metrics"] = self.series
        window = gateway.config.observability.summary_window
        if self.series.recent.maxlen != window:
            self.series.fold()
            self.series.recent = deque(self.series.recent, maxlen=window)
        self.pending = self.series.pending
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
        self.series.sync()
        self._process()
        gateway = self.gateway
        if gateway is not None:
            self.active_streams.set({}, gateway.process_active_streams)
            self.in_flight.set({}, gateway.process_in_flight)
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
    @hookimpl
    def exchange_done(self, exchange: "Exchange") -> None:
        """Record the exchange as one tuple of plain values; the series are updated when the records are folded,
        in batches (:data:`FOLD_EVERY`, and before every scrape or summary)."""
        usage = exchange.usage
        principal = exchange.principal
        attempts = exchange.attempts
        started = exchange.started
        sent = exchange.upstream_sent_at
        overhead = None
        if sent is not None:
            overhead = sent - started
            upstream_first, first = exchange.upstream_first_at, exchange.first_byte_at
            if upstream_first is not None and first is not None and first > upstream_first:
                overhead += first - upstream_first
        pending = self.pending
        pending.append((
            exchange.endpoint, exchange.ingress, exchange.upstream_model or exchange.model, bool(exchange.routes),
            exchange.provider or "none", exchange.status or 0, exchange.stream, started, exchange.first_byte_at,
            exchange.ended, exchange.chunks_sent,
            None if usage is None else usage.prompt_tokens, None if usage is None else usage.completion_tokens,
            "anonymous" if principal is None else principal.tier or "none",
            bool(attempts), attempts if attempts and (len(attempts) > 1 or "error" in attempts[0]) else None,
            exchange.response_headers.get("x-cache"), exchange.tags or None, overhead, exchange.outcome,
        ))
        if len(pending) >= FOLD_EVERY:
            self.series.fold()

    # -- summary ----------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """The FakeAI-style JSON summary over the recent window."""
        self.series.fold()
        records = list(self.series.recent)
        durations: list[float] = []
        ttfts: list[float] = []
        errors: dict[str, int] = {}
        cached: list[bool] = []
        tokens = streams = 0
        busy = 0.0
        for (_, _, _, _, _, status, stream, started, first, ended, _, _, completion, _, tried, _, cache, _, _,
             outcome) in records:
            took = 0.0 if ended is None else ended - started
            durations.append(took)
            if first is not None:
                ttfts.append(first - started)
            kind = error_class(status, outcome, tried)
            if kind is not None:
                errors[kind] = errors.get(kind, 0) + 1
            if completion:
                tokens += completion
                busy += took
            if cache is not None:
                cached.append(cache == "HIT")
            streams += bool(stream)
        # (monotonic times: the span between the first and the last exchange to end, in seconds)
        window = (_end_of(records[-1]) - _end_of(records[0])) if len(records) > 1 else 0.0
        gateway = self.gateway
        return {
            "window": {"requests": len(records), "seconds": round(window, 3)},
            "requests": {"total": len(records), "per_second": round(len(records) / window, 3) if window else None,
                         "streams": streams},
            "latency_seconds": {"p50": _percentile(durations, 0.5), "p95": _percentile(durations, 0.95),
                                "p99": _percentile(durations, 0.99)},
            "ttft_seconds": {"p50": _percentile(ttfts, 0.5), "p95": _percentile(ttfts, 0.95),
                             "p99": _percentile(ttfts, 0.99)},
            "tokens": {"completion": tokens, "per_second": round(tokens / busy, 3) if busy else None},
            "errors": {"total": sum(errors.values()), "rate": round(sum(errors.values()) / len(records), 4)
                       if records else 0.0, "by_class": errors},
            "active_streams": gateway.process_active_streams if gateway is not None else 0,
            "cache": {"hits": sum(cached), "lookups": len(cached),
                      "hit_rate": round(sum(cached) / len(cached), 4) if cached else None},
        }
