"""Liveness, readiness and the detailed health report.

- live: the process answers and its event loop is not stalled (the watchdog measures loop lag each tick);
- ready: not draining, the event loop not stalled, an enabled provider, no plugin reporting itself failing, and
  the shared dependencies the config requires: a provider whose circuit is closed or half-open
  (``observability.ready_requires_providers``, on by default), Redis answering (``ready_requires_redis``, off:
  plugins that need Redis fail readiness themselves when they cannot do without it);
- detailed (``/health``): healthy / degraded / unhealthy with per-component checks, warnings, version, uptime
  and the metrics summary, as in the FakeAI seed.

Plugins join the report by having a ``health()`` method (sync or async) returning a dict with a ``status`` of
``ok``, ``degraded`` or ``failing`` (anything else in the dict is shown as-is).
"""
from __future__ import annotations

import asyncio
import inspect
import time
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .breaker import OPEN

if TYPE_CHECKING:
    from .gateway import Gateway

__all__ = ["liveness", "readiness", "report"]


async def liveness(gateway: "Gateway") -> tuple[bool, dict[str, Any]]:
    """Whether the event loop keeps time: its lag (how long a callback queued now waits, or how late the
    watchdog's timer fired in the last seconds) under ``observability.loop_lag_threshold``."""
    lag = await gateway.watchdog.probe_lag()
    ok = lag < gateway.config.observability.loop_lag_threshold
    return ok, {"status": "ok" if ok else "stalled", "loop_lag_seconds": round(lag, 4)}


async def _redis_check(gateway: "Gateway") -> dict[str, Any]:
    started = time.monotonic()
    try:
        await asyncio.wait_for(gateway.redis.ping(), timeout=gateway.config.redis.socket_timeout + 0.5)
    except Exception as exc:  # any failure means "not reachable"
        return {"status": "failing", "error": f"{type(exc).__name__}: {exc}"}
    return {"status": "ok", "latency_ms": round((time.monotonic() - started) * 1000, 2)}


async def _plugin_checks(gateway: "Gateway") -> dict[str, dict[str, Any]]:
    checks = {}
    for plugin in gateway.plugins:
        health = getattr(plugin.obj, "health", None)
        if health is None or not callable(health):
            continue
        try:
            result = health()
            if inspect.isawaitable(result):
                result = await asyncio.wait_for(result, 2.0)
        except Exception as exc:
            result = {"status": "failing", "error": f"{type(exc).__name__}: {exc}"}
        checks[f"plugin:{plugin.name}"] = result if isinstance(result, dict) else {"status": str(result)}
    return checks


def _provider_checks(gateway: "Gateway") -> dict[str, dict[str, Any]]:
    out = {}
    for name, provider in gateway.providers.items():
        if not provider.config.enabled:
            continue
        state = gateway.breakers[name].current()
        out[f"provider:{name}"] = {
            "status": "failing" if state == OPEN else "ok", "circuit": state, "in_flight": provider.in_flight,
            "ttft_ewma_ms": None if provider.ttft_ewma is None else round(provider.ttft_ewma * 1000, 2),
        }
        cooling = gateway.forwarder.cooldowns.of(name)
        if cooling:  # models resting after a 429 with Retry-After: seconds left (no failure: status stays ok)
            out[f"provider:{name}"]["cooldowns"] = cooling
    return out


async def checks(gateway: "Gateway") -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = {"event_loop": (await liveness(gateway))[1]}
    result.update(_provider_checks(gateway))
    if gateway.config.redis.url:
        result["redis"] = await _redis_check(gateway)
    result.update(await _plugin_checks(gateway))
    return result


async def readiness(gateway: "Gateway", draining: bool) -> tuple[bool, dict[str, Any]]:
    if draining:
        return False, {"status": "draining"}
    found = await checks(gateway)
    providers = [c for k, c in found.items() if k.startswith("provider:")]
    reasons = []
    observability = gateway.config.observability
    if not providers:
        reasons.append("no enabled provider")
    elif observability.ready_requires_providers and all(c["status"] == "failing" for c in providers):
        reasons.append("no provider with a closed or half-open circuit")
    if observability.ready_requires_redis and found.get("redis", {}).get("status") == "failing":
        reasons.append("redis unreachable")
    reasons += [f"{k} failing" for k, c in found.items() if k.startswith("plugin:") and c.get("status") == "failing"]
    if found["event_loop"]["status"] != "ok":
        reasons.append("event loop stalled")
    body = {"status": "ready" if not reasons else "not_ready", "checks": found}
    if reasons:
        body["reasons"] = reasons
    return not reasons, body


#: Error classes of the metrics summary that are the client's doing.
_CLIENT_CLASSES = frozenset({"client", "client_disconnect"})


async def report(gateway: "Gateway", draining: bool) -> tuple[int, dict[str, Any]]:
    ready, body = await readiness(gateway, draining)
    found = body.get("checks") or await checks(gateway)
    failing = [k for k, c in found.items() if c.get("status") not in ("ok", None)]
    providers = [k for k in found if k.startswith("provider:")]
    warnings = [f"{k}: {c.get('status')}" + (f" ({c['error']})" if c.get("error") else "")
                for k, c in found.items() if k in failing]
    summary = None
    metrics = gateway.plugin("metrics")
    if metrics is not None:
        summary = metrics.summary()
        total = summary["requests"]["total"]
        # The gateway's and the upstreams' failures; a client's bad request (4xx) or its going away says
        # nothing of this replica's health, and must not let a misbehaving client flip it to "degraded".
        failed = sum(n for kind, n in summary["errors"]["by_class"].items() if kind not in _CLIENT_CLASSES)
        if total >= 20 and failed / total > 0.05:
            warnings.append(f"High error rate: {failed / total:.1%} of requests failed in the gateway or upstream")
    if draining:
        status = "unhealthy"
        warnings.append("draining: shutting down")
    elif not ready:
        status = "unhealthy"
    elif failing or (providers and any(k in failing for k in providers)) or any(w.startswith("High") for w in warnings):
        status = "degraded"
    else:
        status = "healthy"
    return (200 if status != "unhealthy" else 503), {
        "status": status, "version": __version__, "uptime_seconds": round(time.time() - gateway.started_at, 3),
        "checks": found, "warnings": warnings, "metrics": summary,
    }
