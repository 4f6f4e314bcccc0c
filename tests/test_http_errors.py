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


# -- request bodies that do not arrive, or do not read -------------------------------------------------------
async def raw_post(url: str, head: str, parts: list[bytes], pause: float = 0.0) -> tuple[int, dict[str, str], bytes,
                                                                                          bool]:
    """POST over a raw socket: ``head`` (request line and headers, without the blank line), then ``parts`` of
    the body with ``pause`` seconds between them. Returns status, headers, body, and whether the gateway closed
    the connection after its answer."""
    import asyncio
    from urllib.parse import urlsplit

    u = urlsplit(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    try:
        writer.write(head.encode() + b"\r\n\r\n")
        for i, part in enumerate(parts):
            if i and pause:
                await asyncio.sleep(pause)
            writer.write(part)
            await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
        headers: dict[str, str] = {}
        while (line := await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
        try:
            closed = await asyncio.wait_for(reader.read(), 2) == b""
        except asyncio.TimeoutError:
            closed = False
        return int(status_line.split()[1]), headers, body, closed
    finally:
        writer.close()


@pytest.fixture
async def patient_gw(upstream, gateway_factory):
    """A gateway that waits 0.5 s for a request body."""
    config = config_for(upstream)
    return await gateway_factory(attrs.evolve(config, server=attrs.evolve(config.server, request_body_timeout=0.5)))


def chat_head(path: str, extra: str) -> str:
    return f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n{extra}"


async def test_a_stalled_request_body_gets_408_and_the_connection_closes(patient_gw, upstream):
    import orjson

    body = orjson.dumps(CHAT)
    status, headers, answer, closed = await raw_post(
        patient_gw.base_url + "/chat/completions",
        chat_head("/v1/chat/completions", f"Content-Length: {len(body)}"), [body[:10]])
    assert status == 408
    err = assert_openai_error(orjson.loads(answer))
    assert err["code"] == "request_body_timeout" and "server.request_body_timeout" in err["message"]
    assert headers["x-request-id"]
    assert closed  # not left reading (or lingering on) the rest of the body
    assert upstream.requests == [] and patient_gw.gateway.in_flight == 0


async def test_a_slow_body_that_arrives_in_time_is_served(patient_gw, upstream):
    import orjson

    body = orjson.dumps(CHAT)
    status, _, answer, closed = await raw_post(
        patient_gw.base_url + "/chat/completions",
        chat_head("/v1/chat/completions", f"Content-Length: {len(body)}"), [body[:10], body[10:]], pause=0.1)
    assert status == 200 and orjson.loads(answer)["object"] == "chat.completion"
    assert not closed  # kept alive as usual
    assert len(upstream.requests) == 1


async def test_a_chunked_body_broken_after_its_start_ends_within_the_body_timeout(patient_gw, upstream):
    """aiohttp leaves the body of a request open when its chunked encoding breaks after the handler started
    reading it; the body timeout still ends the request."""
    import orjson

    status, _, answer, closed = await raw_post(
        patient_gw.base_url + "/chat/completions", chat_head("/v1/chat/completions", "Transfer-Encoding: chunked"),
        [b"5\r\n{\"mod\r\n", b"zz\r\nnot a chunk\r\n"], pause=0.1)
    assert status == 408 and closed
    assert assert_openai_error(orjson.loads(answer))["code"] == "request_body_timeout"
    assert upstream.requests == [] and patient_gw.gateway.in_flight == 0


async def test_a_body_its_content_encoding_does_not_decode_is_400(gw, upstream, caplog):
    import orjson

    status, headers, answer, closed = await raw_post(
        gw.base_url + "/chat/completions", chat_head("/v1/chat/completions", "Content-Encoding: gzip\r\n"
                                                                             "Transfer-Encoding: chunked"),
        [b"8\r\nnot gzip\r\n", b"0\r\n\r\n"], pause=0.1)
    assert status == 400 and closed
    err = assert_openai_error(orjson.loads(answer))
    assert err["code"] == "invalid_request_body" and err["type"] == "invalid_request_error"
    assert headers["x-request-id"]
    assert upstream.requests == []
    assert not [r for r in caplog.records if r.levelname == "ERROR"]  # a client's mistake, not a crash
