"""The router plugin: aliases, wildcards, direct provider/model, enabled/priority and the four strategies."""
from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
import attrs
import pytest

from proxy.config.load import ConfigError
from proxy.config.schema import PipelineEntry
from proxy.plugin_manager import load_plugins, new_plugin_manager
from proxy.testing import Script, ScriptedUpstream, config_for
from tests.helpers import CHAT


def evolve_provider(config, index, **changes):
    providers = list(config.providers)
    providers[index] = attrs.evolve(providers[index], **changes)
    return attrs.evolve(config, providers=tuple(providers))


def router(**settings):
    return [PipelineEntry("router", settings)]


async def ask(gw, model="m", n=1, concurrency=1):
    """Send n requests (at most `concurrency` at once); return the providers that answered, in order."""
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession() as s:
        async def one():
            async with sem:
                async with s.post(gw.base_url + "/chat/completions", json={**CHAT, "model": model}) as resp:
                    assert resp.status == 200, await resp.text()
                    await resp.read()
                    return resp.headers["x-ssegate-provider"]
        return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), 60)


@pytest.fixture
async def upstream3():
    up = await ScriptedUpstream.start()
    yield up
    await up.close()


async def test_priority_strategy_and_disabled_providers(upstream, upstream2, upstream3, gateway_factory):
    config = config_for(upstream, upstream2, upstream3)
    config = evolve_provider(evolve_provider(config, 0, enabled=False), 1, priority=9)
    gw = await gateway_factory(config)
    assert set(await ask(gw, n=5)) == {"up2"}


async def test_wildcards_and_models_per_provider(upstream, upstream2, gateway_factory):
    config = evolve_provider(evolve_provider(config_for(upstream, upstream2), 0, models=("gpt-4*",)), 1,
                             models=("claude-*",))
    gw = await gateway_factory(config)
    assert await ask(gw, "gpt-4o") == ["up0"]
    assert await ask(gw, "claude-3-haiku") == ["up1"]
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.base_url + "/chat/completions", json={**CHAT, "model": "llama"}) as resp:
            assert resp.status == 404


async def test_aliases_rewrite_the_model_and_keep_their_order(upstream, upstream2, gateway_factory):
    pipeline = router(aliases={"fast": ["up1/small-model", "up0/other-model"]})
    gw = await gateway_factory(config_for(upstream, upstream2, pipeline=pipeline))
    assert await ask(gw, "fast") == ["up1"]
    assert upstream2.requests[-1]["model"] == "small-model"
    upstream2.script = Script(status=500)
    assert await ask(gw, "fast") == ["up0"]
    assert upstream.requests[-1]["model"] == "other-model"


async def test_provider_slash_model_addresses_a_provider(upstream, upstream2, gateway_factory):
    gw = await gateway_factory(config_for(upstream, upstream2))
    assert await ask(gw, "up1/gpt-4o") == ["up1"]
    assert upstream2.requests[-1]["model"] == "gpt-4o"


async def test_weighted_distribution(upstream, upstream2, gateway_factory):
    config = evolve_provider(config_for(upstream, upstream2, pipeline=router(strategy="weighted")), 0, weight=3.0)
    gw = await gateway_factory(config)
    counts = Counter(await ask(gw, n=400, concurrency=16))
    share = counts["up0"] / 400
    assert 0.65 <= share <= 0.85, counts  # expected 0.75; bounds are 5 standard deviations wide


async def test_least_busy_spreads_concurrent_requests(upstream, upstream2, gateway_factory):
    upstream.script = upstream2.script = Script(first_delay=0.2)
    gw = await gateway_factory(config_for(upstream, upstream2, pipeline=router(strategy="least_busy")))
    counts = Counter(await ask(gw, n=20, concurrency=10))
    assert abs(counts["up0"] - counts["up1"]) <= 4, counts
    assert upstream.in_flight == upstream2.in_flight == 0


async def test_latency_prefers_the_faster_provider(upstream, upstream2, gateway_factory):
    upstream.script = Script(first_delay=0.15)
    upstream2.script = Script(first_delay=0.0)
    gw = await gateway_factory(config_for(upstream, upstream2, pipeline=router(strategy="latency")))
    counts = Counter(await ask(gw, n=20))
    assert counts["up1"] >= 18, counts  # the slow one is measured once or twice, then avoided
    assert gw.gateway.providers["up0"].ttft_ewma > gw.gateway.providers["up1"].ttft_ewma


async def test_groups_choose_strategy_per_model(upstream, upstream2, gateway_factory):
    pipeline = router(strategy="priority", groups=[{"models": ["spread-*"], "strategy": "weighted"}])
    gw = await gateway_factory(config_for(upstream, upstream2, pipeline=pipeline))
    assert set(await ask(gw, "pinned", n=20, concurrency=4)) == {"up0"}
    assert set(await ask(gw, "spread-x", n=60, concurrency=4)) == {"up0", "up1"}


def test_router_config_errors_are_reported():
    with pytest.raises(ConfigError, match="strategy must be one of"):
        load_plugins((PipelineEntry("router", {"strategy": "fastest"}),), new_plugin_manager())
    with pytest.raises(ConfigError, match="unknown key 'alias'"):
        load_plugins((PipelineEntry("router", {"alias": {}}),), new_plugin_manager())


async def test_alias_to_unknown_provider_fails_at_startup(upstream):
    from proxy.gateway import Gateway

    gateway = Gateway(config_for(upstream, pipeline=router(aliases={"x": ["nope/model"]})))
    with pytest.raises(Exception, match="unknown providers: nope/model"):
        await gateway.start()
    await gateway.close()


async def test_the_shipped_config_routes_other_models_past_the_simulator(upstream, gateway_factory):
    """conf/ssegate.yaml: the simulator serves its own models, every other model reaches `local`."""
    from pathlib import Path

    from proxy.config import load_config

    config = load_config(str(Path(__file__).resolve().parent.parent / "conf" / "ssegate.yaml"), env={})
    local = next(p for p in config.providers if p.name == "local")
    config = attrs.evolve(config, providers=tuple(attrs.evolve(p, base_url=upstream.base_url) if p is local else p
                                                  for p in config.providers))
    gw = await gateway_factory(config)
    async with aiohttp.ClientSession() as s:
        for model, provider in (("llama3", "local"), ("gpt-4o-mini", "simulated")):
            async with s.post(gw.base_url + "/chat/completions", json={**CHAT, "model": model}) as resp:
                assert resp.status == 200 and resp.headers["x-ssegate-provider"] == provider, model
    assert [r["model"] for r in upstream.requests] == ["llama3"]
