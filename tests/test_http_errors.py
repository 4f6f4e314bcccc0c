"""Every bad request gets an OpenAI-format error with the right status; every response has X-Request-ID."""
from __future__ import annotations

import re

import aiohttp
import attrs
import pytest

from proxy.testing import config_for
from tests.helpers import CHAT


def assert_openai_error(body: dict) -> dict:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


@pytest.fixture
async def gw(upstream, gateway_factory):
    config = config_for(upstream)
    config = attrs.evolve(config, server=attrs.evolve(config.server, max_request_size=2048))
    return await gateway_factory(config)


@pytest.mark.parametrize("path,data,status,param", [
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"", 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}]}', 400, "model"),
    ("/v1/chat/completions", b'{"model": 5, "messages": [{"role": "user", "content": "x"}]}', 400, "model"),
    ("/v1/chat/completions", b'{"model": "m"}', 400, "messages"),
    ("/v1/chat/completions", b'{"model": "m", "messages": []}', 400, "messages"),
    ("/v1/chat/completions", b'{"model": "m", "messages": ["hi"]}', 400, "messages[0]"),
    ("/v1/chat/completions", b'{"model": "m", "messages": [{"role": "user", "content": "a"}, {"content": "b"}]}',
     400, "messages[1]"),
    ("/v1/chat/completions", b'{"model": "m", "messages": [{"role": "user"}, {"role": "user"}, {"role": 3}]}', 400,
     "messages[2]"),
    ("/v1/chat/completions", b'{"model": "m", "messages": [{"role": "user"}], "stream": "yes"}', 400, "stream"),
    ("/v1/chat/completions", b'{"model": "m", "messages": [{"role": "user"}], "max_tokens": -1}', 400, "max_tokens"),
    ("/v1/chat/completions", b'{"model": "m", "messages": [{"role": "user"}], "temperature": 9}', 400, "temperature"),
    ("/v1/chat/completions", b'{"model": "m", "messages": [{"role": "user"}], "stream_options": {}}', 400,
     "stream_options"),
    ("/v1/completions", b'{"model": "m"}', 400, "prompt"),
    ("/v1/embeddings", b'{"model": "m"}', 400, "input"),
    ("/v1/embeddings", b'{"model": "m", "input": "x", "stream": true}', 400, "stream"),
])
async def test_invalid_requests(gw, upstream, path, data, status, param):
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + path, data=data, headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == status
            err = assert_openai_error(await resp.json())
            assert err["param"] == param
            assert err["type"] == "invalid_request_error"
            assert resp.headers["X-Request-ID"]
    assert upstream.requests == []


async def test_unknown_model_is_404(upstream, gateway_factory):
    from proxy.config.schema import ProviderConfig

    config = config_for(upstream)
    config = attrs.evolve(config, providers=(attrs.evolve(config.providers[0], models=("gpt-4*",)),))
    gw = await gateway_factory(config)
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.base_url + "/chat/completions", json={**CHAT, "model": "llama-3"}) as resp:
            assert resp.status == 404
            err = assert_openai_error(await resp.json())
            assert err["code"] == "model_not_found" and err["param"] == "model"
        async with s.post(gw.base_url + "/chat/completions", json={**CHAT, "model": "gpt-4o"}) as resp:
            assert resp.status == 200
    assert ProviderConfig  # imported for the evolve above


async def test_body_over_the_limit_is_413(gw, upstream):
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.base_url + "/chat/completions", json=big) as resp:
            assert resp.status == 413
            assert assert_openai_error(await resp.json())["code"] == "request_too_large"
    assert upstream.requests == []


async def test_unknown_route_is_404_and_wrong_method_405(gw):
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/v1/nothing") as resp:
            assert resp.status == 404
            assert_openai_error(await resp.json())
            assert resp.headers["X-Request-ID"]
        async with s.get(gw.base_url + "/chat/completions") as resp:
            assert resp.status == 405
            assert assert_openai_error(await resp.json())["code"] == "method_not_allowed"
            assert "POST" in resp.headers["Allow"]


async def test_request_id_is_echoed_or_generated(gw):
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.base_url + "/chat/completions", json=CHAT, headers={"X-Request-ID": "abc-123"}) as r:
            assert r.status == 200 and r.headers["X-Request-ID"] == "abc-123"
        async with s.post(gw.base_url + "/chat/completions", json={**CHAT, "stream": True}) as r:
            await r.read()
            generated = r.headers["X-Request-ID"]
        async with s.get(gw.base_url + "/models") as r:
            assert r.headers["X-Request-ID"] != generated
    assert re.fullmatch("[0-9a-f]{32}", generated)


async def test_models_lists_the_union_of_providers(gateway_factory):
    from proxy.config.schema import Config, ProviderConfig, SimulationConfig

    config = Config(providers=(
        ProviderConfig(name="a", type="simulated", simulation=SimulationConfig(models=("m1", "m2"))),
        ProviderConfig(name="b", type="openai", base_url="http://127.0.0.1:9/v1", models=("m2", "m3", "gpt-*")),
        ProviderConfig(name="c", type="openai", base_url="http://127.0.0.1:9/v1", models=("off",), enabled=False),
    ))
    gw = await gateway_factory(config)
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.base_url + "/models") as r:
            body = await r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["m1", "m2", "m3"]
