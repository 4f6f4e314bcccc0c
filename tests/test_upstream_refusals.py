"""An upstream that refuses a request (401, 403, 404, 429) or answers an error in a shape other than OpenAI's:
who is tried next, what the client is told, what the provider's circuit and cooldowns make of it, and what a
config reload keeps of them. Real upstream servers on 127.0.0.1; the official ``openai`` SDK as the client."""
from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import attrs
import openai
import orjson
import pytest
from aiohttp import web

from proxy.config import load_config
from proxy.config.schema import CircuitBreakerConfig, RetryConfig
from proxy.testing import GatewayServer, Script, ScriptedUpstream, config_for
from tests.conftest import openai_client
from tests.helpers import CHAT, CatchAllUpstream

MESSAGES = CHAT["messages"]


class ErrorUpstream(CatchAllUpstream):
    """Answers every POST with ``status``, ``body`` (bytes) and ``headers``; counts the requests."""

    def __init__(self) -> None:
        self.status = 500
        self.body = b""
        self.headers: dict[str, str] = {"Content-Type": "application/json"}
        self.requests = 0

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.requests += 1
        return web.Response(status=self.status, body=self.body, headers=self.headers)


@pytest.fixture
async def failing():
    up = ErrorUpstream()
    yield await up.start()
    await up.close()


def openai_error(message: str, code: str | None = "invalid_api_key") -> bytes:
    return orjson.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}})


@pytest.mark.parametrize("status", [401, 403])
@pytest.mark.parametrize("stream", [False, True])
async def test_an_upstream_refusing_the_gateways_key_falls_back_and_is_no_client_auth_error(
        failing, upstream, gateway_factory, status, stream):
    failing.status, failing.body = status, openai_error("Incorrect API key provided: sk-bad")
    gw = await gateway_factory(config_for(failing.base_url, upstream, retry_attempts=2))
    client = openai_client(gw.base_url)
    if stream:
        chunks = [c async for c in await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        text = (await client.chat.completions.create(model="m", messages=MESSAGES)).choices[0].message.content
    await client.close()
    assert text == "Hello, world!"
    assert failing.requests == 1  # no retry on the provider that refused the key


async def test_with_no_other_route_the_client_gets_a_502_naming_the_provider_and_the_circuit_opens(
        failing, gateway_factory):
    failing.status, failing.body = 401, openai_error("Incorrect API key provided: sk-bad")
    breaker = CircuitBreakerConfig(failure_threshold=2, recovery_timeout=30)
    gw = await gateway_factory(attrs.evolve(config_for(failing.base_url), circuit_breaker=breaker))
    client = openai_client(gw.base_url)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as info:  # not openai.AuthenticationError
            await client.chat.completions.create(model="m", messages=MESSAGES)
        assert info.value.status_code == 502
        error = info.value.body
        assert error["code"] == "upstream_auth_error" and "'up0'" in error["message"]
        assert "credentials" in error["message"] and "HTTP 401" in error["message"]
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model="m", messages=MESSAGES)
    await client.close()
    assert info.value.status_code == 503 and failing.requests == 2  # every request fails alike: the circuit opened
    assert int(info.value.response.headers["Retry-After"]) in range(28, 31)


async def test_a_404_from_one_provider_lets_the_next_answer(failing, upstream, gateway_factory):
    failing.status = 404
    failing.body = orjson.dumps({"object": "error", "message": "The model `m` does not exist.",
                                 "type": "NotFoundError", "param": None, "code": 404})
    gw = await gateway_factory(config_for(failing.base_url, upstream, retry_attempts=2))
    client = openai_client(gw.base_url)
    answer = await client.chat.completions.create(model="m", messages=MESSAGES)
    assert answer.choices[0].message.content == "Hello, world!" and failing.requests == 1
    # alone, its 404 is the client's answer, in OpenAI's shape, and the circuit is untouched
    gw2 = await gateway_factory(config_for(failing.base_url))
    client2 = openai_client(gw2.base_url)
    for _ in range(6):
        with pytest.raises(openai.NotFoundError) as info:
            await client2.chat.completions.create(model="m", messages=MESSAGES)
    await client.close()
    await client2.close()
    assert "The model `m` does not exist." in info.value.body["message"]
    assert set(info.value.body) >= {"message", "type", "param", "code"}
    assert gw2.gateway.breakers["up0"].current() == "closed"


class OneBusyModel(ScriptedUpstream):
    """Answers every model but ``busy``, which gets 429 with ``Retry-After`` while ``busy_for`` says so."""

    busy_for: str | None = "1"
    #: Sent instead of ``Retry-After: busy_for`` when set.
    busy_headers: dict[str, str] | None = None

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("model") == "busy" and self.busy_for is not None:
            self.requests.append(body)
            return web.json_response({"error": {"message": "Rate limit reached for busy", "type": "requests",
                                                "param": None, "code": "rate_limit_exceeded"}},
                                     status=429, headers=self.busy_headers or {"Retry-After": self.busy_for})
        return await super()._chat(request)


async def _health(gw) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/health") as r:
        return await r.json()


async def test_a_429_with_retry_after_cools_that_model_down_not_the_provider(upstream2, gateway_factory):
    busy = await OneBusyModel.start()
    try:
        breaker = CircuitBreakerConfig(failure_threshold=1, recovery_timeout=60)
        gw = await gateway_factory(attrs.evolve(config_for(busy, upstream2, retry_attempts=0),
                                                circuit_breaker=breaker))
        client = openai_client(gw.base_url)
        for _ in range(4):  # the first meets the 429 and moves on; the next skip the cooling pair
            answer = await client.chat.completions.with_raw_response.create(model="busy", messages=MESSAGES)
            assert answer.headers["x-ssegate-provider"] == "up1"
            assert answer.parse().choices[0].message.content == "Hello, world!"
        assert [r["model"] for r in busy.requests] == ["busy"] and len(upstream2.requests) == 4
        # the provider's other models are still asked there: a rate limit is per model, and no outage
        other = await client.chat.completions.with_raw_response.create(model="other", messages=MESSAGES)
        assert other.headers["x-ssegate-provider"] == "up0" and busy.requests[-1]["model"] == "other"
        assert gw.gateway.breakers["up0"].current() == "closed" and gw.gateway.breakers["up0"].failures == 0
        check = (await _health(gw))["checks"]["provider:up0"]
        assert check["status"] == "ok" and check["circuit"] == "closed"
        assert 0 < check["cooldowns"]["busy"] <= 1.0  # Retry-After, not the 60 s recovery_timeout
        busy.busy_for = None  # the limit has passed
        await asyncio.sleep(1.1)
        again = await client.chat.completions.with_raw_response.create(model="busy", messages=MESSAGES)
        await client.close()
        assert again.headers["x-ssegate-provider"] == "up0" and busy.requests[-1]["model"] == "busy"
        assert "cooldowns" not in (await _health(gw))["checks"]["provider:up0"]
    finally:
        await busy.close()


@pytest.mark.parametrize("stream", [False, True])
async def test_a_cooling_model_with_no_other_route_is_a_429_with_the_pause_left(gateway_factory, stream):
    busy = await OneBusyModel.start()
    busy.busy_for = "30"
    try:
        breaker = CircuitBreakerConfig(failure_threshold=1, recovery_timeout=5)
        gw = await gateway_factory(attrs.evolve(config_for(busy, retry_attempts=0), circuit_breaker=breaker))
        client = openai_client(gw.base_url)
        for _ in range(3):
            with pytest.raises(openai.RateLimitError) as info:
                await client.chat.completions.create(model="busy", messages=MESSAGES, stream=stream)
        await client.close()
        assert len(busy.requests) == 1  # the first is the provider's own 429; the next never leave the gateway
        assert int(info.value.response.headers["Retry-After"]) in (4, 5)  # capped at recovery_timeout
        assert 4000 < int(info.value.response.headers["retry-after-ms"]) <= 5000  # the SDKs read it first
        error = info.value.body
        assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_error"
        assert "'busy'" in error["message"] and "'up0'" in error["message"] and error["param"] is None
    finally:
        await busy.close()


async def test_retry_after_ms_is_read_before_retry_after_and_reaches_the_client(gateway_factory):
    """Azure OpenAI and OpenAI send ``retry-after-ms`` (more precise) beside ``retry-after``; the SDKs read it
    first, and so does the gateway."""
    busy = await OneBusyModel.start()
    busy.busy_headers = {"retry-after-ms": "400", "retry-after": "30"}
    try:
        gw = await gateway_factory(attrs.evolve(config_for(busy, retry_attempts=0),
                                                circuit_breaker=CircuitBreakerConfig(recovery_timeout=60)))
        client = openai_client(gw.base_url)
        with pytest.raises(openai.RateLimitError) as first:
            await client.chat.completions.create(model="busy", messages=MESSAGES)
        assert first.value.response.headers["retry-after-ms"] == "400"  # the upstream's own, passed on
        assert first.value.response.headers["retry-after"] == "30"
        assert 0 < gw.gateway.forwarder.cooldowns.left("up0", "busy") <= 0.4  # not 30 s
        with pytest.raises(openai.RateLimitError) as cooling:
            await client.chat.completions.create(model="busy", messages=MESSAGES)
        assert cooling.value.response.headers["retry-after"] == "1" and len(busy.requests) == 1
        await asyncio.sleep(0.45)
        busy.busy_headers = busy.busy_for = None
        answer = await client.chat.completions.create(model="busy", messages=MESSAGES)
        await client.close()
        assert answer.choices[0].message.content == "Hello, world!" and len(busy.requests) == 2
    finally:
        await busy.close()


async def test_a_provider_without_circuit_breaker_gets_no_cooldown(gateway_factory):
    busy = await OneBusyModel.start()
    try:
        breaker = CircuitBreakerConfig(enabled=False)
        gw = await gateway_factory(attrs.evolve(config_for(busy, retry_attempts=0), circuit_breaker=breaker))
        client = openai_client(gw.base_url)
        for _ in range(3):
            with pytest.raises(openai.RateLimitError):
                await client.chat.completions.create(model="busy", messages=MESSAGES)
        await client.close()
        assert len(busy.requests) == 3  # never skipped: the operator turned skipping off
    finally:
        await busy.close()


async def test_429s_without_retry_after_do_not_open_the_circuit(upstream, upstream2, gateway_factory):
    upstream.script = Script(status=429, error="Rate limit reached")
    breaker = CircuitBreakerConfig(failure_threshold=2, recovery_timeout=60)
    gw = await gateway_factory(attrs.evolve(config_for(upstream, upstream2, retry_attempts=0),
                                            circuit_breaker=breaker))
    client = openai_client(gw.base_url)
    for _ in range(5):
        await client.chat.completions.create(model="m", messages=MESSAGES)
    await client.close()
    assert len(upstream.requests) == 5  # asked every time (it may have capacity again), never shut out
    assert gw.gateway.breakers["up0"].current() == "closed"


@pytest.mark.parametrize(("body", "message"), [
    (b'{"error": "model \'m\' not found, try pulling it first"}', "model 'm' not found, try pulling it first"),
    (b'{"object": "error", "message": "max_tokens is too large", "type": "BadRequestError", "param": null,'
     b' "code": 400}', "max_tokens is too large"),
    (b'{"detail": "Invalid request"}', "Invalid request"),
    (b'{"error": {"message": "Unsupported parameter: \'logit_bias\'"}}', "Unsupported parameter: 'logit_bias'"),
    (b"<html><body><h1>400 Bad Request</h1></body></html>", "<h1>400 Bad Request</h1>"),
], ids=["ollama", "vllm", "fastapi", "openai-partial", "html"])
async def test_error_bodies_of_other_servers_reach_the_client_in_openai_shape(failing, gateway_factory, body,
                                                                              message):
    failing.status, failing.body = 400, body
    gw = await gateway_factory(config_for(failing.base_url))
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.base_url + "/chat/completions", json={**CHAT, "model": "m"}) as resp:
            answer: dict[str, Any] = await resp.json()
    assert resp.status == 400
    error = answer["error"]
    assert set(error) >= {"message", "type", "param", "code"} and set(answer) == {"error"}
    assert message in error["message"] and error["type"] == "invalid_request_error"
    if not body.startswith(b"<"):
        assert '{"' not in error["message"]  # the message, not the upstream's JSON quoted
    assert error["code"] is None or isinstance(error["code"], str)


async def test_the_503_of_an_open_circuit_says_when_to_retry(upstream, gateway_factory):
    upstream.script = Script(status=500)
    breaker = CircuitBreakerConfig(failure_threshold=1, recovery_timeout=7)
    gw = await gateway_factory(attrs.evolve(config_for(upstream, retry_attempts=0), circuit_breaker=breaker,
                                            retry=RetryConfig(backoff_base=0.01)))
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.base_url + "/chat/completions", json=CHAT) as resp:
            assert resp.status == 500
        async with session.post(gw.base_url + "/chat/completions", json=CHAT) as resp:
            body = await resp.json()
            assert resp.status == 503 and body["error"]["code"] == "provider_unavailable"
            assert resp.headers["Retry-After"] in ("6", "7")


def _write(path, providers: list[tuple[str, str, str]]) -> None:
    """A config file: admin key, circuits that open at the first fault, and (name, base_url, extra) providers."""
    lines = ["server: {admin_key: adm}", "circuit_breaker: {failure_threshold: 1, recovery_timeout: 60}",
             "providers:"]
    for i, (name, url, extra) in enumerate(providers):
        lines += [f"  - name: {name}", "    type: openai", f"    base_url: {url}", f"    priority: {i + 1}",
                  "    retry_attempts: 0"] + ([f"    {extra}"] if extra else [])
    path.write_text("\n".join(lines) + "\n")


async def _serving(path, providers: list[tuple[str, str, str]]) -> GatewayServer:
    _write(path, providers)
    return await GatewayServer.start(load_config(str(path)), config_path=str(path))


async def _reload(gw) -> None:
    async with aiohttp.ClientSession() as s, s.post(gw.url + "/admin/reload",
                                                    headers={"Authorization": "Bearer adm"}) as r:
        assert r.status == 200, await r.text()


async def _open_circuit(path, failing, upstream2, name: str, extra: str, spare: str) -> tuple[Any, Any]:
    """A gateway on ``path`` whose first provider ``name`` (``failing``) has just opened its circuit."""
    gw = await _serving(path, [(name, failing.base_url, extra), (spare, upstream2.base_url, "")])
    client = openai_client(gw.base_url)
    await client.chat.completions.create(model="m", messages=MESSAGES)
    assert failing.requests == 1 and gw.gateway.breakers[name].current() == "open"
    return gw, client


async def test_a_reload_keeps_an_open_circuit_of_the_same_upstream_and_resets_a_changed_one(
        tmp_path, failing, upstream2):
    path = tmp_path / "ssegate.yaml"
    gw, client = await _open_circuit(path, failing, upstream2, "down", "", "up")
    try:
        # another setting changes (the healthy provider's timeout): the down one is still skipped
        _write(path, [("down", failing.base_url, ""), ("up", upstream2.base_url, "timeout: 30")])
        await _reload(gw)
        assert gw.current is not gw.gateway
        answer = await client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
        assert answer.headers["x-ssegate-provider"] == "up" and failing.requests == 1
        assert gw.current.breakers["down"].current() == "open"
        # the down provider's circuit settings change: a new circuit, asked again
        _write(path, [("down", failing.base_url, "circuit_breaker: {failure_threshold: 3}"),
                      ("up", upstream2.base_url, "timeout: 30")])
        await _reload(gw)
        await client.chat.completions.create(model="m", messages=MESSAGES)
        await client.close()
        assert failing.requests == 2 and gw.current.breakers["down"].current() == "closed"
    finally:
        await gw.close()


async def test_a_reload_with_a_new_key_for_a_refusing_provider_asks_it_again_at_once(tmp_path, failing, upstream2):
    """The circuit opened on the provider refusing the gateway's key (401): the fix is a new key, and a reload."""
    failing.status, failing.body = 401, openai_error("Incorrect API key provided")
    path = tmp_path / "ssegate.yaml"
    gw, client = await _open_circuit(path, failing, upstream2, "p", "api_key: old", "spare")
    try:
        failing.status, failing.body = 200, orjson.dumps({
            "id": "x", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "new"}}]})
        _write(path, [("p", failing.base_url, "api_key: new"), ("spare", upstream2.base_url, "")])
        await _reload(gw)
        answer = await client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
        await client.close()
        assert answer.headers["x-ssegate-provider"] == "p" and failing.requests == 2
    finally:
        await gw.close()


async def test_a_reload_keeps_the_cooldowns_of_the_same_upstream_and_drops_a_moved_ones(tmp_path, upstream,
                                                                                       upstream2, monkeypatch):
    (tmp_path / "refuses_to_start.py").write_text(
        "from proxy import hookimpl\n\nclass Plugin:\n    @hookimpl\n    def startup(self, gateway):\n"
        "        raise RuntimeError('no licence')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    busy = await OneBusyModel.start()
    busy.busy_for = "30"
    path = tmp_path / "ssegate.yaml"
    gw = await _serving(path, [("p", busy.base_url, ""), ("spare", upstream2.base_url, "")])
    try:
        client = openai_client(gw.base_url)
        await client.chat.completions.create(model="busy", messages=MESSAGES)
        _write(path, [("p", busy.base_url, "timeout: 30"), ("spare", upstream2.base_url, "")])
        await _reload(gw)
        answer = await client.chat.completions.with_raw_response.create(model="busy", messages=MESSAGES)
        assert answer.headers["x-ssegate-provider"] == "spare" and len(busy.requests) == 1
        # a reload that moves p but is refused (a plugin fails to start) leaves the serving config's cooldowns
        _write(path, [("p", upstream.base_url, "timeout: 30"), ("spare", upstream2.base_url, "")])
        with open(path, "a") as f:
            f.write('pipeline: ["refuses_to_start:Plugin", router]\n')
        async with aiohttp.ClientSession() as s, s.post(gw.url + "/admin/reload",
                                                        headers={"Authorization": "Bearer adm"}) as r:
            assert r.status == 422
        answer = await client.chat.completions.with_raw_response.create(model="busy", messages=MESSAGES)
        assert answer.headers["x-ssegate-provider"] == "spare" and len(busy.requests) == 1
        # p now points at another server: what the old one asked for does not hold there
        _write(path, [("p", upstream.base_url, "timeout: 30"), ("spare", upstream2.base_url, "")])
        await _reload(gw)
        answer = await client.chat.completions.with_raw_response.create(model="busy", messages=MESSAGES)
        await client.close()
        assert answer.headers["x-ssegate-provider"] == "p" and len(upstream.requests) == 1
    finally:
        await gw.close()
        await busy.close()


async def test_an_anthropic_client_of_a_cooling_model_gets_a_rate_limit_error_with_the_pause(gateway_factory):
    """``/v1/messages``: the cooldown's 429 in Anthropic's shape (the anthropic SDK's ``RateLimitError``)."""
    import anthropic

    busy = await OneBusyModel.start()
    busy.busy_for = "20"
    try:
        gw = await gateway_factory(attrs.evolve(config_for(busy, retry_attempts=0),
                                                circuit_breaker=CircuitBreakerConfig(recovery_timeout=60)))
        client = anthropic.AsyncAnthropic(base_url=gw.url, api_key="unused", max_retries=0)
        ask = {"model": "busy", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
        for _ in range(2):  # the provider's own 429, then the cooldown's
            with pytest.raises(anthropic.RateLimitError) as info:
                await client.messages.create(**ask)
        await client.close()
        assert len(busy.requests) == 1
        assert info.value.body["error"]["type"] == "rate_limit_error"
        assert int(info.value.response.headers["retry-after"]) in (19, 20)
    finally:
        await busy.close()
