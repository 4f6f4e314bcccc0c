"""The ratelimit plugin: RPM/TPM token buckets, reservations reconciled with real usage, OpenAI's headers,
the memory and Redis backends (same arithmetic), and Redis outages."""
from __future__ import annotations

import asyncio
import math
import random

import aiohttp
import attrs
import openai
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from plugins._ratelimit_core import UNIT, MemoryBackend, RedisBackend, format_duration, transition
from plugins.ratelimit import TIERS, RateLimitPlugin
from proxy import Outcome, Reply, Usage, hookimpl
from proxy.config.schema import PipelineEntry, RedisConfig
from proxy.config.load import ConfigError
from proxy.gateway import Gateway
from proxy.plugin_manager import PluginLoadError, load_plugins, new_plugin_manager
from proxy.testing import Script, config_for
from proxy.tokens import IMAGE_TOKENS, estimate_prompt_tokens, requested_completion_tokens
from tests.helpers import CHAT

ALICE = "sk-test-alice-4f9a1c0e7b2d"
BOB = "sk-test-bob-93c1d0a8e5f7"


class Done:
    """Records finished exchanges; placed after ratelimit, so its exchange_done runs after the reconcile."""

    def __init__(self) -> None:
        self.exchanges: list = []

    @hookimpl
    def exchange_done(self, exchange):
        self.exchanges.append(exchange)

    async def wait(self, n: int):
        for _ in range(500):
            if len(self.exchanges) >= n:
                return self.exchanges[n - 1]
            await asyncio.sleep(0.01)
        raise AssertionError(f"only {len(self.exchanges)} exchanges finished, expected {n}")


@pytest.fixture(params=["memory", "redis"])
def backend(request):
    if request.param == "redis":
        return "redis", request.getfixturevalue("redis_url")
    return "memory", None


async def start(upstream, gateway_factory, backend=("memory", None), keys=(ALICE,), auth=True, models=("*",),
                **ratelimit):
    name, url = backend
    done = Done()
    pipeline = [PipelineEntry("auth", {"keys": list(keys), "keys_env": None})] if auth else []
    pipeline += [PipelineEntry("ratelimit", {"backend": name, **ratelimit}), "done", "router"]
    config = config_for(upstream, pipeline=pipeline, models=models)
    if url:
        config = attrs.evolve(config, redis=RedisConfig(url=url))
    gw = await gateway_factory(config, plugins={"done": done})
    return gw, done


def plugin_of(server, name="ratelimit"):
    return next(p.obj for p in server.gateway.plugins if p.name == name)


async def settled(gw, done: Done, n: int):
    """The n-th exchange, once finished and its reconcile has landed."""
    exchange = await done.wait(n)
    await plugin_of(gw).drain()
    return exchange


def sdk(gw, key=ALICE) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.base_url, api_key=key, max_retries=0)


async def post(gw, body=None, key: str | None = ALICE) -> tuple[int, dict, dict]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.base_url + "/chat/completions", json=body or CHAT, headers=headers) as resp:
            return resp.status, dict(resp.headers), await resp.json()


def reservation(body: dict, default: int = 1024) -> int:
    return estimate_prompt_tokens("chat.completions", body) + requested_completion_tokens("chat.completions", body,
                                                                                           default)


# --- the arithmetic ----------------------------------------------------------------------------------------

def test_reset_durations_are_written_like_openai():
    cases = {0: "0s", -5: "0s", 1: "1ms", 6: "6ms", 999: "999ms", 1000: "1s", 1500: "1.5s", 1234: "1.234s",
             20_000: "20s", 59_999: "59.999s", 60_000: "1m0s", 90_500: "1m30.5s", 360_000: "6m0s",
             3_600_000: "1h0m0s", 3_723_010: "1h2m3.01s"}
    assert {ms: format_duration(ms) for ms in cases} == cases


def test_bucket_transition_takes_all_or_nothing_and_refills_continuously():
    caps, rates, keys = (3 * UNIT, 100 * UNIT), (3, 100), ("r", "t")
    buckets: dict = {}
    assert transition(buckets, keys, caps, rates, (UNIT, 60 * UNIT), True, 1000) == (True, [2 * UNIT, 40 * UNIT])
    assert buckets == {"r": (2 * UNIT, 1000, 3 * UNIT, 3), "t": (40 * UNIT, 1000, 100 * UNIT, 100)}
    before = dict(buckets)
    assert transition(buckets, keys, caps, rates, (UNIT, 41 * UNIT), True, 1000) == (False, [2 * UNIT, 40 * UNIT])
    assert buckets == before  # refused: nothing taken from either bucket
    # 600 ms later: the tokens bucket gained 600 * 100 units = 1 token, the requests bucket 1800 units
    assert transition(dict(before), keys, caps, rates, (UNIT, 41 * UNIT), True, 1600) == (True, [UNIT + 1800, 0])
    # a clock that went backwards refills nothing
    assert transition(dict(before), keys, caps, rates, (UNIT, 0), True, 400) == (True, [UNIT, 40 * UNIT])
    # an extra charge may leave a debt; a refund is capped at capacity, and a full bucket is forgotten
    assert transition(buckets, ("t",), caps[1:], rates[1:], (-70 * UNIT,), False, 1000) == (True, [-30 * UNIT])
    assert transition(buckets, ("t",), caps[1:], rates[1:], (500 * UNIT,), False, 1000) == (True, [100 * UNIT])
    assert "t" not in buckets


async def test_memory_and_redis_backends_compute_identically(redis_url):
    """The same random scenario (explicit clock, backwards steps included) through the Python transition and
    the Lua script: every result and every stored bucket must match."""
    client = aioredis.Redis.from_url(redis_url)
    redis_backend, memory = RedisBackend(), MemoryBackend()
    redis_backend.redis = client
    buckets = {"p:{a}:r": (5 * UNIT, 5), "p:{a}:t": (1000 * UNIT, 1000), "p:{b}:t": (300 * UNIT, 7)}
    rng = random.Random(20240611)
    now = 1_700_000_000_000
    try:
        for _ in range(400):
            now += rng.choice([0, 1, 3, 50, 700, 5000, 20_000, -5])
            roll = rng.random()
            if roll < 0.55:
                keys, amounts, acquire = ["p:{a}:r", "p:{a}:t"], [UNIT, rng.randint(0, 400) * UNIT], True
            elif roll < 0.8:
                keys, amounts, acquire = ["p:{a}:t"], [rng.randint(-200, 300) * UNIT], False
            else:
                keys, amounts, acquire = ["p:{b}:t"], [rng.randint(-50, 120) * UNIT + rng.randint(0, 999)], \
                    rng.random() < 0.7
            caps = [buckets[k][0] for k in keys]
            rates = [buckets[k][1] for k in keys]
            expected = memory.run(keys, caps, rates, amounts, acquire, now=now)
            got = await redis_backend.run(keys, caps, rates, amounts, acquire, now=now)
            assert got == expected
            for key in buckets:
                stored = await client.hgetall(key)
                held = memory.buckets.get(key)
                assert (None if not stored else (int(stored[b"l"]), int(stored[b"t"]))) == (held and held[:2])
                if stored and key in keys and got[0]:  # written now: it expires when it would be full
                    assert await client.pttl(key) > 0
                    await client.persist(key)  # (on the test's clock, not Redis's: keep it for the comparison)
    finally:
        await client.aclose()


def test_memory_sweep_forgets_only_full_buckets():
    memory = MemoryBackend()
    memory.run(["x"], [10 * UNIT], [10], [UNIT], True, now=0)
    memory.run(["y"], [10 * UNIT], [10], [5 * UNIT], True, now=0)
    memory.sweep(UNIT // 10)  # 6 s: x has refilled its 1 request, y not its 5
    assert list(memory.buckets) == ["y"]


# --- requests per minute -----------------------------------------------------------------------------------

async def test_requests_per_minute_with_openai_headers(upstream, gateway_factory, backend):
    gw, _ = await start(upstream, gateway_factory, backend, keys=[f"{ALICE} name=alice rpm=3"])
    async with sdk(gw) as client:
        for i in range(3):
            raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini",
                                                                         messages=CHAT["messages"])
            h = raw.headers
            assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("3", str(2 - i))
            assert h["x-ratelimit-limit-tokens"] == "10000"  # the tier-3 default
            # each earlier request was reconciled to its usage (11); tier-3 refills a token every 6 ms
            remaining = int(h["x-ratelimit-remaining-tokens"])
            assert 10_000 - 11 * i - reservation(CHAT) <= remaining <= 10_000 - reservation(CHAT)
            if i == 0:  # a full bucket less one request refills in 60 s / 3
                assert h["x-ratelimit-reset-requests"] == "20s"
                assert h["x-ratelimit-reset-tokens"] == format_duration(reservation(CHAT) * 6)
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="gpt-4o-mini", messages=CHAT["messages"])
    err = info.value
    assert err.status_code == 429 and err.code == "rate_limit_exceeded" and err.body["type"] == "requests"
    assert "requests per min (RPM): Limit 3, Remaining 0, Requested 1" in err.body["message"]
    h = err.response.headers
    wait_ms = int(h["retry-after-ms"])
    assert 0 < wait_ms <= 20_000 and int(h["retry-after"]) == math.ceil(wait_ms / 1000)
    assert f"Please try again in {format_duration(wait_ms)}." in err.body["message"]
    assert h["x-ratelimit-remaining-requests"] == "0" and h["x-ratelimit-limit-requests"] == "3"
    assert len(upstream.requests) == 3  # the refused request never reached the upstream


async def test_burst_then_continuous_refill(upstream, gateway_factory, backend):
    gw, _ = await start(upstream, gateway_factory, backend, keys=[f"{ALICE} rpm=600 rpm_burst=2 tpm=100000"])
    assert [(await post(gw))[0] for _ in range(2)] == [200, 200]
    status, headers, body = await post(gw)
    assert status == 429 and body["error"]["type"] == "requests"
    wait_ms = int(headers["retry-after-ms"])
    assert 0 < wait_ms <= 100  # 600 RPM: one request every 100 ms
    await asyncio.sleep(wait_ms / 1000 + 0.01)
    status, headers, _ = await post(gw)
    assert status == 200 and headers["x-ratelimit-remaining-requests"] == "0"


# --- tokens per minute -------------------------------------------------------------------------------------

async def test_token_reservation_refuses_before_the_upstream(upstream, gateway_factory, backend):
    """A request whose reservation does not fit while another holds its reservation is refused (type tokens)
    without reaching the upstream; when the first is reconciled, the same request fits."""
    upstream.script = Script(first_delay=0.4)
    gw, done = await start(upstream, gateway_factory, backend, keys=[f"{ALICE} rpm=100 tpm=1 tpm_burst=1000"])
    body = {**CHAT, "max_tokens": 600}
    first = asyncio.create_task(post(gw, body))
    for _ in range(200):
        if upstream.requests:
            break
        await asyncio.sleep(0.01)
    status, headers, refused = await post(gw, body)
    assert status == 429 and refused["error"]["type"] == "tokens"
    assert refused["error"]["code"] == "rate_limit_exceeded"
    assert f"Limit 1, Used {reservation(body)}, Requested {reservation(body)}" in refused["error"]["message"]
    assert int(headers["retry-after-ms"]) > 0 and headers["x-ratelimit-remaining-tokens"] == str(
        1000 - reservation(body))
    assert (await first)[0] == 200
    await settled(gw, done, 2)
    upstream.script = Script()
    status, headers, _ = await post(gw, body)
    assert status == 200 and headers["x-ratelimit-remaining-tokens"] == str(1000 - 11 - reservation(body))
    assert len(upstream.requests) == 2


async def test_a_request_larger_than_the_token_burst_is_refused_outright(upstream, gateway_factory):
    gw, _ = await start(upstream, gateway_factory, keys=[f"{ALICE} tpm=1000"])
    status, headers, body = await post(gw, {**CHAT, "max_tokens": 2000})
    assert status == 429 and body["error"]["type"] == "tokens" and "Request too large" in body["error"]["message"]
    assert "retry-after" not in {k.lower() for k in headers}  # waiting would not help
    assert upstream.requests == []
    assert (await post(gw, {**CHAT, "max_tokens": 900}))[0] == 200


async def test_a_whole_answer_without_usage_is_charged_its_reservation(upstream, gateway_factory, backend):
    """Servers that leave usage out of a non-stream answer must not make it free: the reservation stands."""
    upstream.script = Script(usage=None)
    gw, done = await start(upstream, gateway_factory, backend, keys=[f"{ALICE} rpm=1000 tpm=1 tpm_burst=10000"])
    body = {**CHAT, "max_tokens": 1500}
    for n in (1, 2):
        status, headers, answer = await post(gw, body)
        assert status == 200 and "usage" not in answer or answer["usage"] is None
        exchange = await settled(gw, done, n)
        assert exchange.usage is None
    status, headers, _ = await post(gw, {**CHAT, "max_tokens": 10})
    assert headers["x-ratelimit-remaining-tokens"] == str(10_000 - 2 * reservation(body) - reservation(
        {**CHAT, "max_tokens": 10}))


async def test_tokens_reconcile_with_streamed_usage(upstream, gateway_factory, backend):
    upstream.script = Script(usage={"prompt_tokens": 30, "completion_tokens": 70, "total_tokens": 100})
    gw, done = await start(upstream, gateway_factory, backend, keys=[f"{ALICE} rpm=1000 tpm=1 tpm_burst=10000"])
    async with sdk(gw) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=CHAT["messages"], stream=True, max_tokens=500)
        r1 = reservation({**CHAT, "max_tokens": 500})
        assert raw.headers["x-ratelimit-remaining-tokens"] == str(10_000 - r1)
        chunks = [c async for c in raw.parse()]
        assert all(c.usage is None for c in chunks)  # the usage chunk was not asked for: stripped
        assert upstream.requests[0]["stream_options"] == {"include_usage": True}  # ... but requested upstream
        exchange = await settled(gw, done, 1)
        assert exchange.usage.total_tokens == 100
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=CHAT["messages"], max_tokens=200)
        r2 = reservation({**CHAT, "max_tokens": 200})
        assert raw.headers["x-ratelimit-remaining-tokens"] == str(10_000 - 100 - r2)  # r1 - 100 came back
        await settled(gw, done, 2)
        stream = await client.chat.completions.create(model="gpt-4o-mini", messages=CHAT["messages"],
                                                      stream=True, stream_options={"include_usage": True})
        usage = [c.usage async for c in stream if c.usage]
        assert usage[0].total_tokens == 100
        await settled(gw, done, 3)
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=CHAT["messages"], max_tokens=1)
        assert raw.headers["x-ratelimit-remaining-tokens"] == str(10_000 - 300 - reservation({**CHAT, "max_tokens": 1}))


async def test_tokens_reconcile_when_the_client_disconnects_mid_stream(upstream, gateway_factory, backend):
    upstream.script = Script(texts=[f"t{i} " for i in range(200)], delay=0.01)
    gw, done = await start(upstream, gateway_factory, backend, keys=[f"{ALICE} rpm=1000 tpm=1 tpm_burst=10000"])
    body = {**CHAT, "max_tokens": 2000}
    async with sdk(gw) as client:
        stream = await client.chat.completions.create(model="gpt-4o-mini", messages=CHAT["messages"],
                                                      stream=True, max_tokens=2000)
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
        await stream.close()
        exchange = await settled(gw, done, 1)
        assert exchange.outcome == Outcome.CLIENT_DISCONNECT and exchange.usage is None
        charged = estimate_prompt_tokens("chat.completions", body) + exchange.chunks_sent
        assert exchange.chunks_sent >= 3 and charged < reservation(body)
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=CHAT["messages"], max_tokens=10)
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(10_000 - charged - reservation({**CHAT, "max_tokens": 10}))


async def test_a_request_that_never_got_an_answer_is_refunded_in_full(upstream, gateway_factory, backend):
    upstream.script = Script(status=500)
    gw, done = await start(upstream, gateway_factory, backend, keys=[f"{ALICE} rpm=1000 tpm=1 tpm_burst=10000"],
                           models=("gpt-*",))
    status, _, _ = await post(gw)
    assert status >= 500
    assert (await settled(gw, done, 1)).outcome == Outcome.ERROR
    # refused later in the pipeline (no provider serves the model): nothing charged either
    status, _, body = await post(gw, {**CHAT, "model": "served-by-nobody"})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    await settled(gw, done, 2)
    upstream.script = Script()
    status, headers, _ = await post(gw)
    assert status == 200 and headers["x-ratelimit-remaining-tokens"] == str(10_000 - reservation(CHAT))
    assert headers["x-ratelimit-remaining-requests"] == "997"  # requests are counted, refused or not


class Answering:
    """Answers every request itself, like a cache hit."""

    @hookimpl
    def cached_response(self, exchange):
        exchange.usage = Usage(5, 5, 10)  # even if a plugin reports usage, no upstream spent it
        return Reply(body={"id": "c", "object": "chat.completion", "created": 1, "model": exchange.model,
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": "cached"}}]})


async def test_answers_given_by_a_plugin_count_as_requests_but_cost_no_tokens(upstream, gateway_factory):
    done = Done()
    gw = await gateway_factory(config_for(upstream, pipeline=[
        PipelineEntry("auth", {"keys": [f"{ALICE} rpm=10 tpm=1 tpm_burst=10000"], "keys_env": None}),
        PipelineEntry("ratelimit", {}), "done", "answering", "router"]), plugins={"done": done, "answering": Answering()})
    assert (await post(gw))[2]["choices"][0]["message"]["content"] == "cached"
    await settled(gw, done, 1)
    status, headers, _ = await post(gw)
    assert status == 200 and headers["x-ratelimit-remaining-requests"] == "8"
    assert headers["x-ratelimit-remaining-tokens"] == str(10_000 - reservation(CHAT))
    assert upstream.requests == []


async def test_limits_apply_to_streams_and_answers_alike(upstream, gateway_factory):
    gw, _ = await start(upstream, gateway_factory, keys=[f"{ALICE} rpm=2"])
    async with aiohttp.ClientSession() as s:
        headers = {"Authorization": f"Bearer {ALICE}"}
        async with s.post(gw.base_url + "/chat/completions", json={**CHAT, "stream": True}, headers=headers) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            assert r.headers["x-ratelimit-remaining-requests"] == "1"
            await r.read()
        async with s.post(gw.base_url + "/embeddings", json={"model": "e", "input": "hi"}, headers=headers) as r:
            assert r.status == 200 and r.headers["x-ratelimit-remaining-requests"] == "0"
        async with s.post(gw.base_url + "/chat/completions", json={**CHAT, "stream": True}, headers=headers) as r:
            assert r.status == 429 and r.headers["Content-Type"].startswith("application/json")
            assert (await r.json())["error"]["code"] == "rate_limit_exceeded"


# --- whose limits ------------------------------------------------------------------------------------------

async def test_tiers_custom_limits_and_the_default_tier(upstream, gateway_factory):
    keys = {
        "sk-tier-one-key-000001": "tier=tier-1",
        "sk-tier-five-key-00005": "tier=tier-5",
        "sk-no-tier-key-0000000": "",
        "sk-custom-rpm-key-0007": "tier=tier-1 rpm=7",
        "sk-gold-tier-key-00001": "tier=gold",
        "sk-unknown-tier-key-01": "tier=platinum",
    }
    gw, _ = await start(upstream, gateway_factory, keys=[f"{k} {v}" for k, v in keys.items()],
                        tiers={"gold": {"rpm": 1000, "tpm": 1_000_000, "tpm_burst": 50_000}})
    expected = {
        "sk-tier-one-key-000001": (TIERS["tier-1"].rpm, TIERS["tier-1"].tpm),
        "sk-tier-five-key-00005": (2000, 200_000),
        "sk-no-tier-key-0000000": (100, 10_000),  # default_tier: tier-3, the seed's 100 RPM, 10K TPM
        "sk-custom-rpm-key-0007": (7, 2000),  # the key's rpm, its tier's tpm
        "sk-gold-tier-key-00001": (1000, 1_000_000),
    }
    for key, (rpm, tpm) in expected.items():
        status, headers, _ = await post(gw, key=key)
        assert status == 200
        assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-limit-tokens"]) == (str(rpm), str(tpm))
    _, headers, _ = await post(gw, key="sk-gold-tier-key-00001")
    assert int(headers["x-ratelimit-remaining-tokens"]) < 50_000  # the tier's burst, not its tpm
    status, _, body = await post(gw, key="sk-unknown-tier-key-01")
    assert status == 500 and body["error"]["code"] == "unknown_rate_limit_tier"


async def test_keys_without_limits_pass_unlimited_when_there_is_no_default_tier(upstream, gateway_factory):
    gw, _ = await start(upstream, gateway_factory, keys=[ALICE, f"{BOB} rpm=1"], default_tier=None)
    for _ in range(3):
        status, headers, _ = await post(gw)
        assert status == 200 and "x-ratelimit-limit-requests" not in headers
    assert (await post(gw, key=BOB))[0] == 200 and (await post(gw, key=BOB))[0] == 429


async def test_per_model_buckets(upstream, gateway_factory, backend):
    gw, _ = await start(upstream, gateway_factory, backend, keys=[f"{ALICE} rpm=1", f"{BOB} rpm=1"], per_model=True)
    assert (await post(gw, {**CHAT, "model": "gpt-4o"}))[0] == 200
    assert (await post(gw, {**CHAT, "model": "gpt-4o"}))[0] == 429
    assert (await post(gw, {**CHAT, "model": "gpt-4o-mini"}))[0] == 200
    assert (await post(gw, {**CHAT, "model": "gpt-4o"}, key=BOB))[0] == 200  # another key, its own buckets
    gw2, _ = await start(upstream, gateway_factory, keys=[f"{ALICE} rpm=1"])
    assert (await post(gw2, {**CHAT, "model": "gpt-4o"}))[0] == 200
    assert (await post(gw2, {**CHAT, "model": "gpt-4o-mini"}))[0] == 429  # one bucket per key


async def test_per_model_buckets_count_a_model_under_every_name(upstream, gateway_factory):
    """A router alias and ``provider/model`` reach the same upstream model as its bare name: one set of buckets,
    not one per name (a key could multiply its limit by the names it knows)."""
    pipeline = [PipelineEntry("auth", {"keys": [f"{ALICE} rpm=2"], "keys_env": None}),
                PipelineEntry("ratelimit", {"per_model": True}),
                PipelineEntry("router", {"aliases": {"cheap": ["up0/gpt-4o-mini"], "cheap2": ["gpt-4o-mini"]}})]
    gw = await gateway_factory(config_for(upstream, pipeline=pipeline))
    statuses = [(await post(gw, {**CHAT, "model": name}))[0]
                for name in ("gpt-4o-mini", "cheap", "cheap2", "up0/gpt-4o-mini")]
    assert statuses == [200, 200, 429, 429]
    assert (await post(gw, {**CHAT, "model": "gpt-4o"}))[0] == 200  # another model, its own buckets


async def test_anonymous_ipv6_callers_are_limited_per_64(upstream, gateway_factory):
    """An IPv6 host usually has a whole /64: limited per address, it could rotate through them. (The addresses
    arrive in X-Forwarded-For from a trusted proxy, the only way to have IPv6 clients on 127.0.0.1.)"""
    pipeline = [PipelineEntry("ratelimit", {"anonymous": {"rpm": 1}}), "router"]
    config = config_for(upstream, pipeline=pipeline)
    config = attrs.evolve(config, server=attrs.evolve(config.server, trusted_proxies=("127.0.0.0/8",)))
    gw = await gateway_factory(config)

    async def from_(address: str) -> int:
        async with aiohttp.ClientSession() as s:
            async with s.post(gw.base_url + "/chat/completions", json=CHAT,
                              headers={"X-Forwarded-For": address}) as resp:
                return resp.status

    assert [await from_(a) for a in ("2001:db8::1", "2001:db8::2", "2001:db8:0:1::1")] == [200, 429, 200]
    # an IPv4 client seen through a dual-stack listener is its IPv4 address, not one /64 shared by all of them
    assert [await from_(a) for a in ("::ffff:198.51.100.7", "198.51.100.7", "198.51.100.8")] == [200, 429, 200]


async def test_anonymous_callers_are_limited_per_ip_or_not_at_all(upstream, gateway_factory):
    gw, _ = await start(upstream, gateway_factory, auth=False, anonymous={"rpm": 2})
    assert [(await post(gw, key=None))[0] for _ in range(3)] == [200, 200, 429]
    gw2, _ = await start(upstream, gateway_factory, auth=False)
    for _ in range(3):
        status, headers, _ = await post(gw2, key=None)
        assert status == 200 and not any(k.lower().startswith("x-ratelimit") for k in headers)


# --- the Redis backend: scripts, outages -------------------------------------------------------------------

async def test_script_reloaded_after_script_flush(upstream, gateway_factory, redis_url):
    gw, _ = await start(upstream, gateway_factory, ("redis", redis_url), keys=[f"{ALICE} rpm=5"])
    assert (await post(gw))[1]["x-ratelimit-remaining-requests"] == "4"
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.script_flush()
        assert await client.script_exists(RedisBackend().sha) == [False]
        status, headers, _ = await post(gw)
        assert status == 200 and headers["x-ratelimit-remaining-requests"] == "3"
        assert await client.script_exists(RedisBackend().sha) == [True]
        keys = sorted([k.decode() async for k in client.scan_iter("ssegate:rl:*")])
        assert len(keys) == 2 and all(k.startswith("ssegate:rl:{") for k in keys)
        assert not any(ALICE in k for k in keys)  # counters are keyed by a hash prefix, never the key
    finally:
        await client.aclose()


@pytest.mark.parametrize("mode", ["fail_closed", "fail_open"])
async def test_redis_outage_then_recovery(upstream, gateway_factory, redis_server, mode):
    gw, _ = await start(upstream, gateway_factory, ("redis", redis_server.url), keys=[f"{ALICE} rpm=1000"],
                        on_backend_error=mode, backend_retry_interval=0.05)
    plugin = plugin_of(gw)
    status, headers, _ = await post(gw)
    assert status == 200 and headers["x-ratelimit-remaining-requests"] == "999"
    assert plugin.health()["status"] == "ok"

    redis_server.stop()
    with capture_logs() as logs:
        answers = [await post(gw) for _ in range(5)]
    health = plugin.health()
    if mode == "fail_closed":
        for status, headers, body in answers:
            assert status == 503 and headers["Retry-After"] == "1"
            assert body["error"]["code"] == "rate_limit_backend_unavailable" and "not forwarded" in body["error"]["message"]
        assert len(upstream.requests) == 1
        assert health["status"] == "failing"
    else:
        for status, headers, _ in answers:
            assert status == 200 and "x-ratelimit-remaining-requests" not in headers
        assert len(upstream.requests) == 6
        assert health["status"] == "degraded"
    assert health["backend"] == "redis" and health["on_backend_error"] == mode and health["error"]
    async with aiohttp.ClientSession() as s:  # the gateway's health report includes the plugin's
        async with s.get(gw.url + "/health/ready") as resp:
            ready = await resp.json()
    assert ready["checks"]["plugin:ratelimit"]["status"] == health["status"]
    if mode == "fail_closed":
        assert resp.status == 503 and "plugin:ratelimit failing" in ready["reasons"]
    failures = [e for e in logs if e["event"] == "rate_limit_backend_failed"]
    assert len(failures) == 1 and failures[0]["log_level"] == "error"  # once per outage, not per request

    redis_server.start()  # an empty Redis: no buckets, no script
    with capture_logs() as logs:
        for _ in range(200):
            status, headers, _ = await post(gw)
            if status == 200 and "x-ratelimit-remaining-requests" in headers:
                break
            await asyncio.sleep(0.02)
    assert status == 200 and headers["x-ratelimit-remaining-requests"] == "999"
    assert plugin.health()["status"] == "ok" and plugin.health()["error"] is None
    assert any(e["event"] == "rate_limit_backend_recovered" for e in logs)


async def test_health_recovers_without_traffic(upstream, gateway_factory, redis_server):
    gw, _ = await start(upstream, gateway_factory, ("redis", redis_server.url), keys=[f"{ALICE} rpm=10"],
                        backend_retry_interval=0.05)
    plugin = plugin_of(gw)
    redis_server.stop()
    assert (await post(gw))[0] == 503
    redis_server.start()
    for _ in range(200):
        if plugin.health()["status"] == "ok":
            break
        await asyncio.sleep(0.02)
    assert plugin.health()["status"] == "ok"


async def test_redis_backend_needs_redis_url(upstream):
    """Refused as a configuration error (``check-config`` refuses it too), before anything starts."""
    with pytest.raises(ConfigError) as info:
        Gateway(config_for(upstream, pipeline=[PipelineEntry("ratelimit", {"backend": "redis"}), "router"]))
    assert "pipeline[0].ratelimit.backend" in str(info.value) and "redis.url" in str(info.value)


# --- configuration -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("config, message", [
    ({"backend": "mongo"}, "backend must be one of memory, redis"),
    ({"on_backend_error": "ignore"}, "on_backend_error must be one of fail_closed, fail_open"),
    ({"default_tier": "tier-9"}, "default_tier 'tier-9' is not a tier"),
    ({"tiers": {"gold": {"rpm": 0}}}, "rpm must be between 1"),
    ({"anonymous": {"rpn": 5}}, "unknown key 'rpn'"),
    ({"default_max_tokens": "many"}, "expected an integer"),
])
def test_config_mistakes_are_reported(config, message):
    with pytest.raises(PluginLoadError) as info:
        load_plugins((PipelineEntry("ratelimit", config),), new_plugin_manager())
    assert message in str(info.value)


def test_defaults_follow_the_seed():
    assert RateLimitPlugin.Config().default_tier == "tier-3"
    assert (TIERS["tier-3"].rpm, TIERS["tier-3"].tpm) == (100, 10_000)  # "tier-3  # 100 RPM, 10K TPM"
    assert [TIERS[f"tier-{i}"].rpm for i in range(1, 6)] == sorted(TIERS[f"tier-{i}"].rpm for i in range(1, 6))


# --- token estimates ---------------------------------------------------------------------------------------

def test_prompt_token_estimates():
    chat = {"messages": [{"role": "system", "content": "x" * 40},
                         {"role": "user", "content": [{"type": "text", "text": "y" * 8},
                                                      {"type": "image_url", "image_url": {"url": "data:..."}}]}]}
    assert estimate_prompt_tokens("chat.completions", chat) == 3 + (4 + 10) + (4 + 2 + IMAGE_TOKENS)
    assert estimate_prompt_tokens("chat.completions", {"messages": [{"role": "user", "content": "日本語"}]}) == \
        3 + 4 + 3  # 9 UTF-8 bytes
    assert estimate_prompt_tokens("completions", {"prompt": ["abcd", "abcdefgh"]}) == 3
    assert estimate_prompt_tokens("completions", {"prompt": [1, 2, 3, 4, 5]}) == 5
    assert estimate_prompt_tokens("embeddings", {"input": "a" * 17}) == 5
    assert requested_completion_tokens("chat.completions", {"max_tokens": 50, "n": 3}, 1024) == 150
    assert requested_completion_tokens("chat.completions", {"max_completion_tokens": 7}, 1024) == 7
    assert requested_completion_tokens("chat.completions", {}, 1024) == 1024
    assert requested_completion_tokens("embeddings", {"max_tokens": 50}, 1024) == 0


async def test_memory_limits_survive_a_config_reload(tmp_path, upstream):
    """A reload builds new plugin instances; the memory buckets are handed over, not reset."""
    import textwrap

    from proxy.config import load_config
    from proxy.testing import GatewayServer

    path = tmp_path / "ssegate.yaml"
    path.write_text(textwrap.dedent(f"""\
        server: {{admin_key: adm}}
        providers: [{{name: up, base_url: "{upstream.base_url}"}}]
        pipeline:
          - auth: {{keys: ["{ALICE} tier=tiny"], keys_env: null}}
          - ratelimit: {{backend: memory, default_tier: tiny, tiers: {{tiny: {{rpm: 2, tpm: 100000}}}}}}
          - router
        """))
    gw = await GatewayServer.start(load_config(str(path)), config_path=str(path))
    headers = {"Authorization": f"Bearer {ALICE}"}
    try:
        async with aiohttp.ClientSession() as s:
            statuses = []
            for _ in range(2):
                async with s.post(gw.base_url + "/chat/completions", json=CHAT, headers=headers) as r:
                    statuses.append(r.status)
            async with s.post(gw.url + "/admin/reload", headers={"Authorization": "Bearer adm"}) as r:
                assert r.status == 200
            async with s.post(gw.base_url + "/chat/completions", json=CHAT, headers=headers) as r:
                statuses.append(r.status)
        assert statuses == [200, 200, 429]
        assert gw.current is not gw.gateway
    finally:
        await gw.close()
