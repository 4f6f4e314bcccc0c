"""The built-in ``cache`` plugin: keys, what is stored, faithful replay, backends (memory and a real Redis)."""
from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import attrs
import orjson
import pytest
import redis.asyncio as aioredis

from plugins.cache import CacheConfig, CachePlugin, CacheState
from proxy import Outcome
from proxy.config.schema import PipelineEntry, RedisConfig
from proxy.plugin_manager import PluginLoadError
from proxy.testing import Script, config_for
from tests.conftest import openai_client
from tests.helpers import CHAT, ReasoningUpstream, Recorder, content_of, data_events, read_stream

DET = {**CHAT, "temperature": 0}
STREAM = {**DET, "stream": True}
TEXTS = ["Hel", "lo, ", "wor", "ld!"]


def plugin_of(gw: Any, name: str = "cache") -> Any:
    return next(p.obj for p in gw.gateway.plugins if p.name == name)


async def until(predicate: Any, timeout: float = 5.0) -> None:
    """Wait (bounded) for a condition another task makes true, e.g. a store in exchange_done."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached within the time limit")
        await asyncio.sleep(0.005)


async def start(upstream, gateway_factory, *, redis_url: str | None = None, router: Any = "router",
                extra: list | None = None, **cfg: Any):
    pipeline = [PipelineEntry("cache", cfg), *(extra or []), router]
    config = config_for(upstream, pipeline=pipeline)
    if redis_url:
        config = attrs.evolve(config, redis=RedisConfig(url=redis_url))
    plugins = {"rec": Recorder()} if "rec" in [getattr(e, "name", e) for e in pipeline] else None
    gw = await gateway_factory(config, plugins=plugins)
    return gw, plugin_of(gw)


def strip_fresh(objs: list) -> list:
    """Chunks without the fields a replay renews (id, created)."""
    out = []
    for obj in objs:
        if isinstance(obj, dict):
            obj = {k: v for k, v in obj.items() if k not in ("id", "created")}
        out.append(obj)
    return out


# -- keys ---------------------------------------------------------------------------------------------------

BASE = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "temperature": 0,
        "max_tokens": 50}


def test_key_is_canonical_and_ignores_transport_fields():
    cache = CachePlugin()
    key = cache.key_for(BASE)
    same = [
        dict(reversed(list(BASE.items()))),
        {**BASE, "stream": True, "stream_options": {"include_usage": True}},
        {**BASE, "user": "alice", "metadata": {"trace": "1"}, "store": False},
        {**BASE, "temperature": 0.0},
        {**BASE, "n": 1},
        {**BASE, "top_p": None, "seed": None},
        {**BASE, "messages": [{"content": "hi", "role": "user"}]},
    ]
    assert {cache.key_for(body) for body in same} == {key}
    assert cache.key_for({**BASE, "stop": "x"}) == cache.key_for({**BASE, "stop": ["x"]})
    # Stable across processes and releases: a change here must come with a KEY_VERSION bump.
    assert key == "ssegate:cache:shared:" + "913ace89ccd9c3d12f3b2f8ecadf7a83c23a0fe27e37d07d646bc214b11ad639"


def test_key_changes_with_every_semantic_field():
    cache = CachePlugin()
    variants = [
        BASE,
        {**BASE, "model": "gpt-4o"},
        {**BASE, "messages": [{"role": "user", "content": "hi!"}]},
        {**BASE, "messages": [{"role": "system", "content": "hi"}]},
        {**BASE, "temperature": 0.2},
        {**BASE, "top_p": 0.5},
        {**BASE, "max_tokens": 51},
        {**BASE, "seed": 1},
        {**BASE, "n": 2},
        {**BASE, "stop": ["\n"]},
        {**BASE, "response_format": {"type": "json_object"}},
        {**BASE, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]},
        {**BASE, "tool_choice": "none"},
        {**BASE, "presence_penalty": 0.5},
        {**BASE, "frequency_penalty": 0.5},
        {**BASE, "logit_bias": {"50256": -100}},
        {**BASE, "some_future_parameter": True},  # unknown fields count: an extra miss beats a wrong hit
    ]
    keys = [cache.key_for(body) for body in variants]
    assert len(set(keys)) == len(variants)
    assert cache.key_for(BASE, "completions") != cache.key_for(BASE, "chat.completions")


def test_key_namespaces_and_aliases():
    shared = CachePlugin(CacheConfig(model_aliases={"gpt4": "gpt-4o"}))
    assert shared.key_for({**BASE, "model": "gpt4"}) == shared.key_for({**BASE, "model": "gpt-4o"})
    assert shared.key_for(BASE, scope="p:alice") == shared.key_for(BASE, scope="p:bob")
    per_key = CachePlugin(CacheConfig(namespace="per_key", key_prefix="app1"))
    alice, bob = per_key.key_for(BASE, scope="p:alice"), per_key.key_for(BASE, scope="p:bob")
    assert alice != bob and alice.startswith("app1:k-") and "alice" not in alice
    assert alice.rsplit(":", 1)[1] == bob.rsplit(":", 1)[1]  # same request hash, different namespace


async def test_router_alias_and_its_target_share_an_entry(upstream, gateway_factory):
    upstream.script = Script(texts=TEXTS)
    router = PipelineEntry("router", {"aliases": {"fast": ["up0/gpt-4o-mini"]}})
    gw, cache = await start(upstream, gateway_factory, router=router)
    url = gw.base_url + "/chat/completions"
    _, headers, _ = await read_stream(url, {**STREAM, "model": "fast"})
    assert headers["x-cache"] == "MISS"
    await until(lambda: cache.stats.stores == 1)
    _, headers, events = await read_stream(url, {**STREAM, "model": "up0/gpt-4o-mini"})
    assert headers["x-cache"] == "HIT" and content_of(events) == "Hello, world!"
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("namespace,warned", [("shared", True), ("per_key", False)])
async def test_a_shared_cache_behind_authentication_is_pointed_out(upstream, gateway_factory, namespace, warned):
    from structlog.testing import capture_logs

    pipeline = [PipelineEntry("auth", {"keys": ["sk-test-one-4f9a1c0e7b2d"], "keys_env": None}),
                PipelineEntry("cache", {"namespace": namespace}), "router"]
    with capture_logs() as logs:
        await gateway_factory(config_for(upstream, pipeline=pipeline))
    assert any(e["event"] == "cache_shared_across_keys" for e in logs) is warned


async def test_per_key_namespace_separates_api_keys(upstream, gateway_factory):
    gw, cache = await start(upstream, gateway_factory, namespace="per_key")
    url = gw.base_url + "/chat/completions"
    await read_stream(url, STREAM, headers={"Authorization": "Bearer key-a"})
    await until(lambda: cache.stats.stores == 1)
    _, h_b, _ = await read_stream(url, STREAM, headers={"Authorization": "Bearer key-b"})
    _, h_a, _ = await read_stream(url, STREAM, headers={"Authorization": "Bearer key-a"})
    assert (h_b["x-cache"], h_a["x-cache"]) == ("MISS", "HIT")
    assert len(upstream.requests) == 2
    # Anthropic's and Azure's credential headers separate callers too (they were all "anonymous")
    for header in ("x-api-key", "api-key"):
        _, h_c, _ = await read_stream(url, STREAM, headers={header: "key-c"})
        assert h_c["x-cache"] == "MISS", header
    assert len(upstream.requests) == 4


# -- replay -------------------------------------------------------------------------------------------------

async def sdk_stream(client, **kw):
    raw = await client.chat.completions.with_raw_response.create(stream=True, **kw)
    stream = raw.parse()
    return raw.headers, [chunk.model_dump() async for chunk in stream]


async def test_hit_replays_the_stream_chunk_for_chunk_through_the_sdk(upstream, gateway_factory):
    upstream.script = Script(texts=TEXTS)
    gw, cache = await start(upstream, gateway_factory)
    client = openai_client(gw.base_url)
    try:
        h1, first = await sdk_stream(client, model="gpt-4o-mini", messages=CHAT["messages"], temperature=0)
        await until(lambda: cache.stats.stores == 1)
        h2, second = await sdk_stream(client, model="gpt-4o-mini", messages=CHAT["messages"], temperature=0)
    finally:
        await client.close()
    assert (h1["x-cache"], h2["x-cache"]) == ("MISS", "HIT")
    assert len(upstream.requests) == 1
    assert [c["choices"][0]["delta"]["content"] for c in second[1:-1]] == TEXTS
    assert strip_fresh(second) == strip_fresh(first)
    ids = {c["id"] for c in second}
    assert len(ids) == 1 and ids != {"chatcmpl-scripted"}
    assert all(c["created"] != 1700000000 and abs(c["created"] - time.time()) < 600 for c in second)
    assert int(h2["age"]) >= 0


async def test_hit_raw_events_equal_the_original_ones(upstream, gateway_factory):
    upstream.script = Script(texts=TEXTS)
    gw, cache = await start(upstream, gateway_factory)
    url = gw.base_url + "/chat/completions"
    _, _, first = await read_stream(url, STREAM)
    await until(lambda: cache.stats.stores == 1)
    _, _, second = await read_stream(url, STREAM)
    assert len(second) == len(first) == len(TEXTS) + 3  # role, texts, finish, [DONE]
    assert strip_fresh(data_events(second)) == strip_fresh(data_events(first))


async def test_usage_is_replayed_only_when_the_client_asks(upstream, gateway_factory):
    gw, cache = await start(upstream, gateway_factory)
    url = gw.base_url + "/chat/completions"
    await read_stream(url, STREAM)  # recorded without a usage chunk: the usage comes from exchange.usage
    await until(lambda: cache.stats.stores == 1)
    _, _, with_usage = await read_stream(url, {**STREAM, "stream_options": {"include_usage": True}})
    objs = data_events(with_usage)
    assert objs[-1] == "[DONE]"
    assert objs[-2]["choices"] == [] and objs[-2]["usage"] == upstream.script.usage
    assert objs[-2]["id"] == objs[0]["id"]
    _, _, without = await read_stream(url, STREAM)
    assert all(not (o.get("usage") if isinstance(o, dict) else None) for o in data_events(without))
    assert len(upstream.requests) == 1


async def test_stream_entry_serves_a_non_stream_request_and_the_reverse(upstream, gateway_factory):
    upstream.script = Script(texts=TEXTS)
    gw, cache = await start(upstream, gateway_factory)
    client = openai_client(gw.base_url)
    try:
        await sdk_stream(client, model="gpt-4o-mini", messages=CHAT["messages"], temperature=0)
        await until(lambda: cache.stats.stores == 1)
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=CHAT["messages"], temperature=0)
        answer = raw.parse()
        assert raw.headers["x-cache"] == "HIT"
        assert answer.choices[0].message.content == "Hello, world!"
        assert answer.choices[0].finish_reason == "stop" and answer.object == "chat.completion"
        assert answer.usage.total_tokens == 11

        other = [{"role": "user", "content": "another question"}]
        await client.chat.completions.create(model="gpt-4o-mini", messages=other, temperature=0)
        await until(lambda: cache.stats.stores == 2)
        headers, chunks = await sdk_stream(client, model="gpt-4o-mini", messages=other, temperature=0,
                                           stream_options={"include_usage": True})
    finally:
        await client.close()
    assert headers["x-cache"] == "HIT"
    assert "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks if c["choices"]) == "Hello, world!"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["usage"]["total_tokens"] == 11
    assert len(upstream.requests) == 2


async def test_embeddings_are_cached(upstream, gateway_factory):
    gw, cache = await start(upstream, gateway_factory)
    client = openai_client(gw.base_url)
    try:
        first = await client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
        await until(lambda: cache.stats.stores == 1)
        second = await client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    finally:
        await client.close()
    assert [d.embedding for d in second.data] == [d.embedding for d in first.data]
    assert len(upstream.requests) == 1


async def test_hits_count_no_upstream_tokens(upstream, gateway_factory):
    gw, cache = await start(upstream, gateway_factory, extra=["rec"])
    rec = plugin_of(gw, "rec")
    url = gw.base_url + "/chat/completions"
    await read_stream(url, STREAM)
    await until(lambda: cache.stats.stores == 1)
    await read_stream(url, STREAM)
    await until(lambda: len(rec.done) == 2)
    miss, hit = rec.done
    assert miss.usage is not None and miss.usage.total_tokens == 11 and miss.outcome == Outcome.OK
    assert hit.usage is None and hit.provider is None and hit.outcome == Outcome.SHORT_CIRCUIT
    assert hit.state[CacheState].status == "HIT"
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.stores, stats.tokens_saved) == (1, 1, 1, 11)
    assert stats.bytes_stored > 0 and stats.bytes_served == stats.bytes_stored


async def test_replay_pacing_follows_the_original_gaps(upstream, gateway_factory):
    upstream.script = Script(texts=["a", "b", "c", "d"], delay=0.1)
    gw, cache = await start(upstream, gateway_factory, replay_pacing=True)
    url = gw.base_url + "/chat/completions"
    await read_stream(url, STREAM)
    await until(lambda: cache.stats.stores == 1)
    entry = await cache.entry(cache.key_for(STREAM, scope="anonymous"))
    assert len(entry["delays"]) == len(entry["chunks"]) and entry["delays"][0] == 0
    assert sum(entry["delays"]) >= 0.4  # five 0.1 s gaps upstream
    t0 = time.monotonic()
    _, headers, events = await read_stream(url, STREAM)
    assert headers["x-cache"] == "HIT" and content_of(events) == "abcd"
    assert time.monotonic() - t0 >= 0.4


# -- what is not stored -------------------------------------------------------------------------------------

FAILURES = {
    "http_500": Script(status=500),
    "error_event": Script(texts=["a", "b", "c"], error_event_after=1),
    "cut": Script(texts=["a", "b", "c"], cut_after=2),
    "no_finish_reason": Script(texts=["a", "b"], finish_reason=None),  # type: ignore[arg-type]
}


_STREAM_ONLY = ("error_event", "cut")  # failures that only a stream can have


@pytest.mark.parametrize("name,stream", [(n, s) for n in FAILURES for s in (True, False)
                                         if s or n not in _STREAM_ONLY])
async def test_failed_or_incomplete_answers_are_not_stored(upstream, gateway_factory, name, stream):
    upstream.script = FAILURES[name]
    gw, cache = await start(upstream, gateway_factory, extra=["rec"])
    rec = plugin_of(gw, "rec")
    url = gw.base_url + "/chat/completions"
    body = STREAM if stream else DET
    for _ in range(2):
        async with aiohttp.ClientSession() as s:
            try:
                async with s.post(url, json=body) as resp:
                    await resp.read()
            except aiohttp.ClientPayloadError:
                pass
    await until(lambda: len(rec.done) == 2)
    assert cache.stats.stores == 0 and cache.stats.hits == 0
    assert sum(cache.stats.not_stored.values()) == 2
    assert len(upstream.requests) >= 2  # the second request was not answered from the cache


async def test_client_disconnect_is_not_stored(upstream, gateway_factory):
    upstream.script = Script(texts=[f"t{i}" for i in range(50)], delay=0.02)
    gw, cache = await start(upstream, gateway_factory, extra=["rec"])
    rec = plugin_of(gw, "rec")
    async with aiohttp.ClientSession() as s:
        resp = await s.post(gw.base_url + "/chat/completions", json=STREAM)
        seen = 0
        async for line in resp.content:
            seen += line.startswith(b"data: {")
            if seen == 3:
                break
        resp.close()
    await until(lambda: len(rec.done) == 1)
    assert rec.done[0].outcome == Outcome.CLIENT_DISCONNECT
    assert cache.stats.stores == 0 and cache.stats.not_stored == {"client_disconnect": 1}


async def test_non_deterministic_requests_bypass_unless_configured(upstream, gateway_factory):
    gw, cache = await start(upstream, gateway_factory)
    url = gw.base_url + "/chat/completions"
    for _ in range(2):
        _, headers, _ = await read_stream(url, {**CHAT, "stream": True})  # no temperature: default 1
        assert headers["x-cache"] == "BYPASS"
    _, headers, _ = await read_stream(url, {**CHAT, "stream": True, "temperature": 0.9, "seed": 7})
    assert headers["x-cache"] == "MISS"  # a seed makes it deterministic enough
    assert cache.stats.bypasses == 2 and len(upstream.requests) == 3

    gw2, cache2 = await start(upstream, gateway_factory, only_deterministic=False)
    url2 = gw2.base_url + "/chat/completions"
    await read_stream(url2, {**CHAT, "stream": True})
    await until(lambda: cache2.stats.stores == 1)
    _, headers, _ = await read_stream(url2, {**CHAT, "stream": True})
    assert headers["x-cache"] == "HIT"


async def test_cache_control_no_cache_and_no_store(upstream, gateway_factory):
    upstream.script = Script(texts=["v1"])
    gw, cache = await start(upstream, gateway_factory)
    url = gw.base_url + "/chat/completions"
    _, headers, _ = await read_stream(url, STREAM, headers={"Cache-Control": "no-store"})
    assert headers["x-cache"] == "MISS"
    await asyncio.sleep(0.05)
    assert cache.stats.stores == 0 and cache.stats.not_stored == {}
    await read_stream(url, STREAM)
    await until(lambda: cache.stats.stores == 1)
    upstream.script = Script(texts=["v2"])
    _, headers, events = await read_stream(url, STREAM, headers={"Cache-Control": "no-cache"})
    assert headers["x-cache"] == "BYPASS" and content_of(events) == "v2"  # fetched fresh...
    await until(lambda: cache.stats.stores == 2)
    _, headers, events = await read_stream(url, STREAM)
    assert headers["x-cache"] == "HIT" and content_of(events) == "v2"  # ...and stored for the next ones
    _, headers, events = await read_stream(url, STREAM, headers={"Cache-Control": "no-store"})
    assert headers["x-cache"] == "HIT"  # no-store still reads
    _, headers, _ = await read_stream(url, STREAM, headers={"Cache-Control": "max-age=0"})
    assert headers["x-cache"] == "MISS"  # the entry is older than the client accepts
    assert len(upstream.requests) == 4


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_entries_expire_after_ttl(upstream, gateway_factory, redis_url, backend):
    gw, cache = await start(upstream, gateway_factory, backend=backend, ttl=0.6,
                            redis_url=redis_url if backend == "redis" else None)
    url = gw.base_url + "/chat/completions"
    await read_stream(url, STREAM)
    await until(lambda: cache.stats.stores == 1)
    _, headers, _ = await read_stream(url, STREAM)
    assert headers["x-cache"] == "HIT"
    await asyncio.sleep(0.8)
    _, headers, _ = await read_stream(url, STREAM)
    assert headers["x-cache"] == "MISS"
    assert len(upstream.requests) == 2


async def test_memory_backend_is_bounded_lru(upstream, gateway_factory):
    gw, cache = await start(upstream, gateway_factory, max_entries=2)
    url = gw.base_url + "/chat/completions"

    async def ask(word: str) -> str:
        _, headers, _ = await read_stream(url, {**STREAM, "messages": [{"role": "user", "content": word}]})
        return headers["x-cache"]

    assert await ask("a") == "MISS"
    await until(lambda: cache.stats.stores == 1)
    assert await ask("b") == "MISS"
    await until(lambda: cache.stats.stores == 2)
    assert await ask("a") == "HIT"  # a is now the most recently used
    assert await ask("c") == "MISS"
    await until(lambda: cache.stats.stores == 3)
    assert len(cache.backend) == 2 and cache.backend.evictions == 1
    assert await ask("b") == "MISS"  # b was the least recently used: evicted
    await until(lambda: cache.stats.stores == 4)
    assert await ask("c") == "HIT"


async def test_memory_backend_byte_bound_and_max_entry_size(upstream, gateway_factory):
    upstream.script = Script(texts=["x" * 200])
    gw, cache = await start(upstream, gateway_factory, max_bytes=3000, max_entry_bytes=1500)
    url = gw.base_url + "/chat/completions"
    for i in range(6):
        await read_stream(url, {**STREAM, "messages": [{"role": "user", "content": f"q{i}"}]})
        await until(lambda: cache.stats.stores == i + 1)
        assert cache.backend.bytes <= 3000
    assert cache.backend.evictions >= 3
    upstream.script = Script(texts=["y" * 400] * 5)  # ~2 KB of events: over max_entry_bytes
    await read_stream(url, {**STREAM, "messages": [{"role": "user", "content": "big"}]})
    await until(lambda: cache.stats.not_stored.get("too_large") == 1)
    _, headers, _ = await read_stream(url, {**STREAM, "messages": [{"role": "user", "content": "big"}]})
    assert headers["x-cache"] == "MISS"


async def test_a_fallback_after_a_failed_attempt_records_only_what_the_client_got(upstream, upstream2,
                                                                                  gateway_factory):
    upstream.script = Script(texts=["never"], error_event_after=0)  # role chunk, then an error event
    upstream2.script = Script(texts=TEXTS)
    config = config_for(upstream, upstream2, pipeline=[PipelineEntry("cache", {}), "router"])
    gw = await gateway_factory(config)
    cache = plugin_of(gw)
    url = gw.base_url + "/chat/completions"
    _, _, live = await read_stream(url, STREAM)
    assert content_of(live) == "Hello, world!" and len(upstream2.requests) == 1
    await until(lambda: cache.stats.stores == 1)
    _, headers, replay = await read_stream(url, STREAM)
    assert headers["x-cache"] == "HIT"
    assert strip_fresh(data_events(replay)) == strip_fresh(data_events(live))


# -- Redis ----------------------------------------------------------------------------------------------------

async def test_redis_backend_uses_the_shared_pool_and_serves_every_replica(upstream, gateway_factory, redis_url):
    upstream.script = Script(texts=TEXTS)
    gw1, cache1 = await start(upstream, gateway_factory, backend="redis", redis_url=redis_url, ttl=60,
                              compression=True, compression_min_bytes=0)
    gw2, cache2 = await start(upstream, gateway_factory, backend="redis", redis_url=redis_url, ttl=60)
    assert cache1.backend.client is gw1.gateway.redis  # no second pool
    await read_stream(gw1.base_url + "/chat/completions", STREAM)
    await until(lambda: cache1.stats.stores == 1)
    _, headers, events = await read_stream(gw2.base_url + "/chat/completions", STREAM)
    assert headers["x-cache"] == "HIT" and content_of(events) == "Hello, world!"
    assert len(upstream.requests) == 1
    direct = aioredis.Redis.from_url(redis_url)
    try:
        keys = [k async for k in direct.scan_iter(match="ssegate:cache:*")]
        assert len(keys) == 1
        blob = await direct.get(keys[0])
        assert blob[:1] == b"Z"  # compressed (the seed's `compression: true`)
        assert 0 < await direct.pttl(keys[0]) <= 60_000
    finally:
        await direct.aclose()
    await cache2.clear()
    _, headers, _ = await read_stream(gw1.base_url + "/chat/completions", STREAM)
    assert headers["x-cache"] == "MISS"


async def test_redis_outage_serves_requests_without_the_cache(upstream, gateway_factory, redis_server):
    gw, cache = await start(upstream, gateway_factory, backend="redis", redis_url=redis_server.url)
    url = gw.base_url + "/chat/completions"
    await read_stream(url, STREAM)
    await until(lambda: cache.stats.stores == 1)
    redis_server.stop()
    status, headers, events = await read_stream(url, STREAM)
    assert status == 200 and headers["x-cache"] == "MISS" and content_of(events) == "Hello, world!"
    await until(lambda: cache.stats.errors >= 2)  # the failed get, then the failed set
    redis_server.start()  # an empty Redis again: the cache works on without a restart
    await read_stream(url, STREAM)
    await until(lambda: cache.stats.stores == 2)
    _, headers, _ = await read_stream(url, STREAM)
    assert headers["x-cache"] == "HIT"


# -- configuration --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg,message", [
    ({"backend": "memcached"}, "backend must be one of memory, redis"),
    ({"ttl": 0}, "ttl must be positive"),
    ({"namespace": "user"}, "namespace must be one of shared, per_key"),
    ({"endpoints": ["images"]}, "unknown endpoint 'images'"),
    ({"tll": 5}, "unknown key 'tll' (did you mean 'ttl'?)"),
])
def test_bad_settings_are_startup_errors(upstream, cfg, message):
    from proxy.plugin_manager import load_plugins, new_plugin_manager

    with pytest.raises(PluginLoadError) as info:
        load_plugins((PipelineEntry("cache", cfg),), new_plugin_manager())
    assert message in str(info.value)


async def test_redis_backend_without_redis_url_fails_at_startup(upstream, gateway_factory):
    with pytest.raises(Exception, match="redis.url"):
        await gateway_factory(config_for(upstream, pipeline=[PipelineEntry("cache", {"backend": "redis"}),
                                                             "router"]))


def test_entries_are_self_describing_and_versioned():
    from plugins._cache_store import decode_entry, encode_entry

    entry = {"v": 1, "kind": "body", "body": {"x": "y" * 2000}}
    assert decode_entry(encode_entry(entry, False, 0)) == entry
    packed = encode_entry(entry, True, 100)
    assert packed[:1] == b"Z" and len(packed) < 200 and decode_entry(packed) == entry
    assert decode_entry(encode_entry({**entry, "v": 999}, False, 0)) is None
    assert decode_entry(b"Jnot json") is None and decode_entry(b"Z\x00\x01") is None
    assert decode_entry(orjson.dumps(entry)) is None  # no tag: not ours


def commented_block(name: str) -> list:
    """The commented example of a plugin's settings in conf/ssegate.yaml, uncommented and parsed."""
    from pathlib import Path

    from ruamel.yaml import YAML

    lines = (Path(__file__).resolve().parent.parent / "conf" / "ssegate.yaml").read_text().splitlines()
    start = lines.index(f"  # - {name}:")
    block = [lines[start][4:]]
    for line in lines[start + 1:]:
        if not line.startswith("  #     ") and not line.startswith("  #  "):
            break
        block.append(line[4:])
    return YAML(typ="safe").load("\n".join(block))


def test_the_commented_example_in_conf_is_a_valid_configuration():
    from proxy.plugin_manager import load_plugins, new_plugin_manager

    ((name, settings),) = commented_block("cache")[0].items()
    assert name == "cache" and set(settings) == {f.name for f in attrs.fields(CacheConfig)}
    (loaded,) = load_plugins((PipelineEntry("cache", settings),), new_plugin_manager())
    assert loaded.config == CacheConfig()  # the example shows the defaults


async def test_memory_entries_and_counters_survive_a_config_reload(tmp_path, upstream):
    """A reload builds new plugin instances: the memory cache is handed over (with the new bounds)."""
    import textwrap

    from proxy.config import load_config
    from proxy.testing import GatewayServer

    path = tmp_path / "ssegate.yaml"

    def write(max_entries: int) -> None:
        path.write_text(textwrap.dedent(f"""\
            server: {{admin_key: adm}}
            providers: [{{name: up, base_url: "{upstream.base_url}"}}]
            pipeline:
              - cache: {{max_entries: {max_entries}}}
              - router
            """))

    write(10)
    gw = await GatewayServer.start(load_config(str(path)), config_path=str(path))
    try:
        old = plugin_of(gw)
        url = gw.base_url + "/chat/completions"
        for word in ("a", "b"):
            await read_stream(url, {**STREAM, "messages": [{"role": "user", "content": word}]})
        await until(lambda: old.stats.stores == 2)
        write(1)
        async with aiohttp.ClientSession() as s:
            async with s.post(gw.url + "/admin/reload", headers={"Authorization": "Bearer adm"}) as r:
                assert r.status == 200
        new = next(p.obj for p in gw.current.plugins if p.name == "cache")
        assert new is not old and new.backend is old.backend and new.stats is old.stats
        assert len(new.backend) == 1  # the new bound applied: the least recently used entry left
        _, headers, _ = await read_stream(url, {**STREAM, "messages": [{"role": "user", "content": "b"}]})
        assert headers["x-cache"] == "HIT"
        assert new.stats.hits == 1 and len(upstream.requests) == 2
    finally:
        await gw.close()


@pytest.mark.parametrize("first_streamed", [True, False], ids=["stream-then-whole", "whole-then-stream"])
async def test_a_replay_in_the_other_mode_keeps_the_log_probabilities(gateway_factory, first_streamed):
    from proxy.config.load import load_config

    config = attrs.evolve(load_config(env={}), pipeline=(PipelineEntry("cache", {}), PipelineEntry("router")))
    gw = await gateway_factory(config)
    cache = plugin_of(gw)
    ask = dict(model="gpt-4o-mini", messages=CHAT["messages"], temperature=0, logprobs=True, top_logprobs=2,
               max_tokens=6)
    async with openai_client(gw.base_url) as client:
        async def streamed():
            raw = await client.chat.completions.with_raw_response.create(stream=True, **ask)
            chunks = [c async for c in raw.parse()]
            return raw.headers["x-cache"], [lp for c in chunks if c.choices and c.choices[0].logprobs
                                            for lp in c.choices[0].logprobs.content]

        async def whole():
            raw = await client.chat.completions.with_raw_response.create(**ask)
            return raw.headers["x-cache"], raw.parse().choices[0].logprobs.content

        first, second = (streamed, whole) if first_streamed else (whole, streamed)
        miss, stored = await first()
        await until(lambda: cache.stats.stores == 1)
        hit, replayed = await second()
    assert (miss, hit) == ("MISS", "HIT")
    assert len(stored) == 6 and [t.model_dump() for t in replayed] == [t.model_dump() for t in stored]


@pytest.mark.parametrize("first", ["stream", "whole"])
async def test_a_reasoning_models_thinking_survives_a_replay_in_the_other_mode(gateway_factory, first):
    """Stored as a stream's chunks and replayed whole, or stored whole and replayed as a stream: the thinking
    (``reasoning_content``) comes back with the answer."""
    up = await ReasoningUpstream(["Because ", "so."], ["4", "2."]).start()
    try:
        gw, _ = await start(up.base_url, gateway_factory, only_deterministic=False)
        url = gw.base_url + "/chat/completions"
        answers = []
        for stream in ([True, False] if first == "stream" else [False, True]):
            if stream:
                status, _, events = await read_stream(url, {**CHAT, "stream": True})
                answers.append(data_events(events))
            else:
                async with aiohttp.ClientSession() as s, s.post(url, json=CHAT) as r:
                    status = r.status
                    answers.append(await r.json())
            assert status == 200
    finally:
        await up.close()
    assert len(up.requests) == 1  # the second was the cache's
    for answer in answers:
        if isinstance(answer, dict):
            message = answer["choices"][0]["message"]
            assert (message["reasoning_content"], message["content"]) == ("Because so.", "42.")
        else:
            deltas = [c["choices"][0]["delta"] for c in answer if isinstance(c, dict) and c.get("choices")]
            assert "".join(d.get("reasoning_content") or "" for d in deltas) == "Because so."
            assert "".join(d.get("content") or "" for d in deltas) == "42."
