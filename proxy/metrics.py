"""Prometheus collectors for ssegate and its plugins (aioprometheus), created once per process.

The registry lives as long as the process: a config reload builds a new Gateway with the same registry, and
``counter``/``gauge``/``histogram`` return the collector already registered under a name, so counters never
reset on reload.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import Any, Sequence, TypeVar

from aioprometheus.collectors import Counter, Gauge, Histogram, Registry
from aioprometheus.renderer import render

__all__ = ["Registry", "counter", "gauge", "histogram", "render_metrics", "FastCounter", "FastHistogram",
           "LATENCY_BUCKETS", "TOKEN_BUCKETS"]

C = TypeVar("C")

#: Seconds: from 5 ms (time to first token on a fast local model) to 5 minutes (long generations).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                   float("inf"))
#: Seconds between tokens.
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, float("inf"))


def _existing(registry: Registry, name: str, cls: type) -> Any:
    for collector in registry.collectors.values():
        if collector.name == name:
            if not isinstance(collector, cls):
                raise ValueError(f"metric {name!r} already registered as {type(collector).__name__}")
            return collector
    return None


def counter(registry: Registry, name: str, doc: str) -> Counter:
    return _existing(registry, name, Counter) or Counter(name, doc, registry=registry)


def gauge(registry: Registry, name: str, doc: str) -> Gauge:
    return _existing(registry, name, Gauge) or Gauge(name, doc, registry=registry)


def histogram(registry: Registry, name: str, doc: str, buckets: Sequence[float] = LATENCY_BUCKETS) -> Histogram:
    return _existing(registry, name, Histogram) or Histogram(name, doc, registry=registry, buckets=buckets)


def render_metrics(registry: Registry, accept: Sequence[str] = ()) -> tuple[bytes, dict[str, str]]:
    return render(registry, list(accept) or ["text/plain"])


class FastCounter:
    """A labelled counter whose updates cost a dict increment; values reach the aioprometheus collector at
    scrape time (:meth:`sync`). aioprometheus rebuilds a label key on every update (about 9 µs here), which
    per request would cost more than relaying a whole stream."""

    __slots__ = ("collector", "labelnames", "values")

    def __init__(self, collector: Counter, labelnames: tuple[str, ...] = ()) -> None:
        self.collector = collector
        self.labelnames = labelnames
        self.values: dict[tuple[Any, ...], float] = {}  # label values, made strings by sync()

    def inc(self, key: tuple[Any, ...] = (), amount: float = 1) -> None:
        values = self.values
        values[key] = values.get(key, 0) + amount

    def sync(self) -> None:
        names = self.labelnames
        for key, value in self.values.items():
            self.collector.set_value({name: str(label) for name, label in zip(names, key)}, value)


class FastHistogram:
    """A labelled histogram with the same scrape-time hand-over as :class:`FastCounter`."""

    __slots__ = ("collector", "labelnames", "bounds", "series")

    def __init__(self, collector: Histogram, labelnames: tuple[str, ...] = ()) -> None:
        self.collector = collector
        self.labelnames = labelnames
        self.bounds = tuple(float(b) for b in collector.upper_bounds)
        self.series: dict[tuple[str, ...], list[float]] = {}  # per key: bucket counts..., sum, count

    def observe(self, key: tuple[str, ...], value: float) -> None:
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = [0.0] * (len(self.bounds) + 2)
        series[bisect_left(self.bounds, value)] += 1
        series[-2] += value
        series[-1] += 1

    def observe_many(self, key: tuple[str, ...], values: list[float]) -> None:
        """Observe a batch of values (sorted in place): one C-level sort and a bisection per bucket bound,
        instead of a bisection and three list updates per value."""
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = [0.0] * (len(self.bounds) + 2)
        values.sort()
        below = 0
        for i, bound in enumerate(self.bounds):
            upto = bisect_right(values, bound)  # values <= bound: Prometheus' "le"
            series[i] += upto - below
            below = upto
        series[-2] += sum(values)
        series[-1] += len(values)

    def sync(self) -> None:
        from aioprometheus.histogram import Histogram as Aggregate

        names = self.labelnames
        n = len(self.bounds)
        for key, series in self.series.items():
            agg = Aggregate(*self.bounds)
            cumulative = 0.0
            for i, bound in enumerate(self.bounds):
                cumulative += series[i]
                agg.buckets[bound] = int(cumulative)
            agg.sum = series[n]
            agg.observations = int(series[n + 1])
            self.collector.set_value(dict(zip(names, key)), agg)
