"""``cache`` and ``moderation`` in either pipeline order (docs/cache-and-moderation.md, "Pipeline order").

What the order does not change: input checks run before any cache lookup (every ``check_request`` runs before
``cached_response``), cached answers are moderated on the way out like live ones, and an answer moderation
stopped is never stored. What it changes: where the cache records a miss — before moderation it records the
upstream's stream as it arrived (its pacing), after moderation the stream the client received (the hold-back
window's bunching). The chunks themselves are the same: moderation releases held chunks unchanged.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from plugins.moderation import ModerationConfig
from plugins._moderation_rules import Rule
from proxy.config.schema import PipelineEntry
from proxy.testing import Script, config_for
from tests.helpers import CHAT, content_of, data_events, read_stream

ORDERS = {"cache_first": ["cache", "moderation"], "moderation_first": ["moderation", "cache"]}
STREAM = {**CHAT, "stream": True, "temperature": 0}


async def until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached within the time limit")
        await asyncio.sleep(0.005)


async def start(upstream, gateway_factory, order: list[str], moderation: dict[str, Any] | None = None,
                cache: dict[str, Any] | None = None):
    settings = {"cache": cache or {}, "moderation": moderation or {}}
    config = config_for(upstream, pipeline=[*(PipelineEntry(n, settings[n]) for n in order), "router"])
    gw = await gateway_factory(config)
    plugins = {p.name: p.obj for p in gw.gateway.plugins}
    return gw, plugins["cache"], plugins["moderation"]


def tighten(moderation: Any, keyword: str, applies_to: tuple[str, ...]) -> None:
    """A rule change while entries are cached (what a reload of edited rule files does)."""
    moderation.config = ModerationConfig(rules=(Rule(category="policy", score=0.9, keywords=(keyword,),
                                                     applies_to=applies_to),))
    moderation.reload()


@pytest.mark.parametrize("order", list(ORDERS))
async def test_input_checks_run_before_the_cache_lookup(upstream, gateway_factory, order):
    gw, cache, moderation = await start(upstream, gateway_factory, ORDERS[order])
    url = gw.base_url + "/chat/completions"
    body = {**STREAM, "messages": [{"role": "user", "content": "tell me about gamma rays"}]}
    await read_stream(url, body)
    await until(lambda: cache.stats.stores == 1)
    _, headers, _ = await read_stream(url, body)
    assert headers["x-cache"] == "HIT"
    tighten(moderation, "gamma", ("input",))
    status, headers, _ = await read_stream(url, body)
    assert status == 400 and "x-cache" not in headers  # refused before the cache was asked
    assert cache.stats.hits == 1 and len(upstream.requests) == 1


@pytest.mark.parametrize("order", list(ORDERS))
async def test_cached_answers_are_moderated_and_a_stopped_entry_is_evicted(upstream, gateway_factory, order):
    upstream.script = Script(texts=["The answer ", "is gam", "ma rays."])
    gw, cache, moderation = await start(upstream, gateway_factory, ORDERS[order])
    url = gw.base_url + "/chat/completions"
    await read_stream(url, STREAM)
    await until(lambda: cache.stats.stores == 1)
    tighten(moderation, "gamma", ("output",))
    _, headers, events = await read_stream(url, STREAM)
    assert headers["x-cache"] == "HIT"
    assert "gam" not in content_of(events)
    assert data_events(events)[-2]["choices"][0]["finish_reason"] == "content_filter"
    await until(lambda: cache.stats.evicted_stopped == 1)
    _, headers, events = await read_stream(url, STREAM)
    assert headers["x-cache"] == "MISS"  # the stopped entry is gone; the live answer is stopped too...
    assert data_events(events)[-2]["choices"][0]["finish_reason"] == "content_filter"
    await asyncio.sleep(0.05)
    assert cache.stats.stores == 1 and cache.stats.not_stored.get("stopped") == 1  # ...and not stored
    assert moderation.stats.output_flagged == 2


async def test_the_order_decides_what_pacing_the_cache_records(upstream, gateway_factory):
    """cache first: the upstream's gaps; moderation first: the client's (held chunks released together)."""
    upstream.script = Script(texts=["one ", "two ", "three ", "four "], delay=0.1)
    entries = {}
    for name, order in ORDERS.items():
        gw, cache, _ = await start(upstream, gateway_factory, order,
                                   moderation={"rules": [{"category": "x", "keywords": ["zzz"]}],
                                               "holdback_chars": 1000},
                                   cache={"replay_pacing": True})
        _, _, events = await read_stream(gw.base_url + "/chat/completions", STREAM)
        assert content_of(events) == "one two three four "
        await until(lambda: cache.stats.stores == 1)
        entries[name] = await cache.entry(cache.key_for(STREAM, scope="anonymous"))
    first, second = entries["cache_first"], entries["moderation_first"]
    assert first["chunks"] == second["chunks"]  # same chunks either way: moderation releases them unchanged
    # delays[0] is the role chunk, delays[1] the wait for the first content chunk; then 0.1 s gaps upstream.
    assert all(d >= 0.05 for d in first["delays"][2:5])
    assert all(d < 0.05 for d in second["delays"][2:])  # released in one go when the answer finished
