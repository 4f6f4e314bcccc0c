"""Failover, retries, circuit breakers, first-token fallback and mid-stream continuation, on real sockets."""
from __future__ import annotations

import asyncio

import aiohttp
import attrs
import pytest

from proxy.breaker import CLOSED, HALF_OPEN, OPEN
from proxy.config.schema import CircuitBreakerConfig, PipelineEntry, RetryConfig
from proxy.testing import Script, ScriptedUpstream, config_for
from tests.conftest import openai_client
from tests.helpers import CHAT, Recorder, content_of, data_events, read_stream

STREAM = {**CHAT, "stream": True}


def evolve_provider(config, index, **changes):
    providers = list(config.providers)
    providers[index] = attrs.evolve(providers[index], **changes)
    return attrs.evolve(config, providers=tuple(providers))


@pytest.fixture
async def upstream3():
    up = await ScriptedUpstream.start()
    yield up
    await up.close()


async def test_failover_across_dead_failing_and_healthy(upstream, upstream2, gateway_factory):
    upstream.script = Script(status=500, error="broken")
    upstream2.script = Script(texts=["healthy"])
    gw = await gateway_factory(config_for("http://127.0.0.1:9/v1", upstream, upstream2))
    for body in (STREAM, CHAT):
        async with aiohttp.ClientSession() as s:
            async with s.post(gw.base_url + "/chat/completions", json=body) as resp:
                assert resp.status == 200
                assert resp.headers["x-ssegate-provider"] == "up2"
                text = await resp.text()
        assert "healthy" in text
    assert len(upstream.requests) == 2 and len(upstream2.requests) == 2


async def test_retry_honours_retry_after(upstream, gateway_factory):
    upstream.script = Script(status=429, retry_after="1", fail_times=1, texts=["second time"])
    gw = await gateway_factory(config_for(upstream, retry_attempts=2))
    client = openai_client(gw.base_url)
    answer = await client.chat.completions.create(model="m", messages=CHAT["messages"])
    await client.close()
    assert answer.choices[0].message.content == "second time"
    assert len(upstream.requests) == 2
    assert upstream.times[1] - upstream.times[0] >= 0.95


async def test_retries_are_bounded_then_the_error_is_returned(upstream, gateway_factory):
    upstream.script = Script(status=503, error="still down")
    config = attrs.evolve(config_for(upstream, retry_attempts=2),
                          retry=RetryConfig(backoff_base=0.01, backoff_max=0.02))
    gw = await gateway_factory(config)
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.base_url + "/chat/completions", json=CHAT) as resp:
            assert resp.status == 503
            assert (await resp.json())["error"]["message"] == "still down"
    assert len(upstream.requests) == 3


async def test_retry_after_longer_than_allowed_moves_on(upstream, upstream2, gateway_factory):
    upstream.script = Script(status=429, retry_after="120")
    config = attrs.evolve(config_for(upstream, upstream2, retry_attempts=3), retry=RetryConfig(max_retry_after=5))
    gw = await gateway_factory(config)
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.base_url + "/chat/completions", json=CHAT) as resp:
            assert resp.status == 200 and resp.headers["x-ssegate-provider"] == "up1"
    assert len(upstream.requests) == 1


async def test_client_errors_are_not_retried_nor_failed_over(upstream, upstream2, gateway_factory):
    upstream.script = Script(status=400, error="bad request")
    gw = await gateway_factory(config_for(upstream, upstream2, retry_attempts=2))
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.base_url + "/chat/completions", json=CHAT) as resp:
            assert resp.status == 400
    assert len(upstream.requests) == 1 and upstream2.requests == []
    assert gw.gateway.breakers["up0"].failures == 0


async def test_circuit_breaker_opens_skips_and_recovers(upstream, upstream2, gateway_factory):
    upstream.script = Script(status=500)
    breaker = CircuitBreakerConfig(failure_threshold=2, recovery_timeout=0.5, half_open_max_calls=1)
    gw = await gateway_factory(attrs.evolve(config_for(upstream, upstream2), circuit_breaker=breaker))
    state = gw.gateway.breakers["up0"]
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.post(gw.base_url + "/chat/completions", json=CHAT) as resp:
                assert resp.status == 200 and resp.headers["x-ssegate-provider"] == "up1"
        assert state.current() == OPEN
        for _ in range(3):  # open: up0 is not even asked
            async with s.post(gw.base_url + "/chat/completions", json=CHAT) as resp:
                assert resp.headers["x-ssegate-provider"] == "up1"
        assert len(upstream.requests) == 2
        await asyncio.sleep(0.6)
        assert state.current() == HALF_OPEN
        upstream.script = Script(texts=["back"])
        async with s.post(gw.base_url + "/chat/completions", json=CHAT) as resp:
            assert resp.headers["x-ssegate-provider"] == "up0"
        assert state.current() == CLOSED


async def test_half_open_admits_a_bounded_number_of_trials(upstream, upstream2, gateway_factory):
    upstream.script = Script(status=500)
    breaker = CircuitBreakerConfig(failure_threshold=1, recovery_timeout=0.3, half_open_max_calls=2)
    gw = await gateway_factory(attrs.evolve(config_for(upstream, upstream2), circuit_breaker=breaker))
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.base_url + "/chat/completions", json=CHAT) as resp:
            assert resp.status == 200
        await asyncio.sleep(0.35)
        upstream.script = Script(first_delay=0.5, texts=["slow trial"])
        bodies = await asyncio.gather(*(s.post(gw.base_url + "/chat/completions", json=CHAT) for _ in range(5)))
        providers = sorted(r.headers["x-ssegate-provider"] for r in bodies)
        for r in bodies:
            r.release()
    assert providers.count("up0") == 2 and providers.count("up1") == 3
    assert gw.gateway.breakers["up0"].current() == CLOSED


async def test_all_circuits_open_is_503(upstream, gateway_factory):
    upstream.script = Script(status=500)
    breaker = CircuitBreakerConfig(failure_threshold=1, recovery_timeout=60)
    gw = await gateway_factory(attrs.evolve(config_for(upstream), circuit_breaker=breaker))
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.base_url + "/chat/completions", json=CHAT) as resp:
            assert resp.status == 500
        async with s.post(gw.base_url + "/chat/completions", json=CHAT) as resp:
            assert resp.status == 503
            assert (await resp.json())["error"]["code"] == "provider_unavailable"
    assert len(upstream.requests) == 1


async def test_first_token_timeout_falls_back(upstream, upstream2, gateway_factory):
    upstream.script = Script(first_delay=3)
    upstream2.script = Script(texts=["quick"])
    gw = await gateway_factory(config_for(upstream, upstream2, first_token_timeout=0.3))
    status, headers, events = await read_stream(gw.base_url + "/chat/completions", STREAM)
    assert status == 200 and content_of(events) == "quick" and headers["x-ssegate-provider"] == "up1"
    await asyncio.wait_for(upstream.cancel_event.wait(), 2)


def continue_config(*upstreams):
    router = PipelineEntry("router", {"groups": [{"models": ["*"], "on_midstream_failure": "continue"}]})
    return config_for(*upstreams, pipeline=[router])


@pytest.mark.parametrize("echo", [False, True])
async def test_midstream_continuation_is_seamless(upstream, upstream2, gateway_factory, echo):
    upstream.script = Script(texts=["The ", "quick ", "brown ", "fox ", "jumps"], cut_after=3)
    tail = ["fox ", "jumps ", "over."]
    upstream2.script = Script(texts=(["The quick ", "brown "] if echo else []) + tail,
                              usage={"prompt_tokens": 20, "completion_tokens": 3, "total_tokens": 23})
    gw = await gateway_factory(continue_config(upstream, upstream2))
    client = openai_client(gw.base_url)
    stream = await client.chat.completions.create(model="m", messages=CHAT["messages"], stream=True,
                                                  stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    await client.close()
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The quick brown fox jumps over."
    assert {c.id for c in chunks} == {"chatcmpl-scripted"}
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.role) == 1
    assert chunks[-1].usage.completion_tokens == 3 + 3  # the continuation's own plus the 3 broken-off chunks
    asked = upstream2.requests[-1]["messages"]
    assert asked[-1] == {"role": "assistant", "content": "The quick brown "}
    assert asked[:-1] == CHAT["messages"]


async def test_midstream_failure_without_continuation_ends_with_error(upstream, upstream2, gateway_factory):
    upstream.script = Script(texts=["a", "b", "c"], cut_after=2)
    gw = await gateway_factory(config_for(upstream, upstream2))
    _, _, events = await read_stream(gw.base_url + "/chat/completions", STREAM)
    objs = data_events(events)
    assert content_of(events) == "ab" and objs[-1] == "[DONE]" and "error" in objs[-2]
    assert upstream2.requests == []


async def test_midstream_continuation_with_no_route_left_ends_with_error(upstream, gateway_factory):
    upstream.script = Script(texts=["a", "b", "c"], cut_after=2)
    gw = await gateway_factory(continue_config(upstream))
    _, _, events = await read_stream(gw.base_url + "/chat/completions", STREAM)
    objs = data_events(events)
    assert content_of(events) == "ab" and objs[-1] == "[DONE]" and "error" in objs[-2]


async def test_midstream_idle_stall_continues_on_the_next_route(upstream, upstream2, gateway_factory):
    upstream.script = Script(texts=["one ", "two ", "three"], hang_after=2)
    upstream2.script = Script(texts=["three"])
    config = evolve_provider(continue_config(upstream, upstream2), 0, idle_timeout=0.3)
    gw = await gateway_factory(config)
    _, _, events = await read_stream(gw.base_url + "/chat/completions", STREAM)
    assert content_of(events) == "one two three"
    assert data_events(events)[-1] == "[DONE]"


async def test_upstream_failures_name_the_provider_not_the_network_behind_it(upstream, gateway_factory):
    """The client learns which provider failed and how; the address and the library's text stay with the gateway
    (the attempt's ``detail``, which the upstream_failed log line carries too)."""
    recorder = Recorder()
    gw = await gateway_factory(config_for("http://127.0.0.1:9/v1", pipeline=["recorder", "router"]),
                               plugins={"recorder": recorder})
    async with aiohttp.ClientSession() as s, s.post(gw.base_url + "/chat/completions", json=CHAT) as resp:
        assert resp.status == 502
        err = (await resp.json())["error"]
    assert err["code"] == "upstream_connect_error" and err["message"].startswith("provider 'up0' could not be reached")
    assert "127.0.0.1" not in err["message"] and ":9" not in err["message"]
    (attempt,) = recorder.done[0].attempts
    assert attempt["error"] == "connect" and "127.0.0.1:9" in attempt["detail"]

    upstream.script = Script(cut_after=1)  # the connection is cut after the first content chunk
    gw = await gateway_factory(config_for(upstream, pipeline=["recorder", "router"]), plugins={"recorder": recorder})
    status, _, events = await read_stream(gw.base_url + "/chat/completions", STREAM)
    assert status == 200 and data_events(events)[-1] == "[DONE]"
    err = data_events(events)[-2]["error"]
    assert err["message"].startswith("provider 'up0': its answer could not be read (")
    (attempt,) = recorder.done[1].attempts
    assert attempt["error"] == "midstream" and attempt["detail"]  # aiohttp's own account, for the operator


async def test_an_upstreams_own_error_body_reaches_the_client_unchanged(upstream, gateway_factory):
    upstream.script = Script(status=400, error="context too long")
    gw = await gateway_factory(config_for(upstream))
    async with aiohttp.ClientSession() as s, s.post(gw.base_url + "/chat/completions", json=CHAT) as resp:
        assert resp.status == 400
        assert await resp.json() == {"error": {"message": "context too long", "type": "server_error", "param": None,
                                               "code": "scripted"}}
