"""The hook pipeline: order from the config, short-circuits, fail-closed errors, exchange_done exactly once."""
from __future__ import annotations

import asyncio

import aiohttp
import pytest

from proxy import Chunk, GatewayError, Outcome, Principal, Reply, StopStream, hookimpl
from proxy.config.schema import PipelineEntry
from proxy.testing import Script, config_for
from tests.conftest import openai_client
from tests.helpers import CHAT, content_of, data_events, read_stream

STREAM = {**CHAT, "stream": True}


class Tracer:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log
        self.done: list = []

    @hookimpl
    async def authenticate(self, exchange):
        self.log.append(f"{self.name}.authenticate")

    @hookimpl
    def check_request(self, exchange):
        self.log.append(f"{self.name}.check_request")

    @hookimpl
    async def cached_response(self, exchange):
        self.log.append(f"{self.name}.cached_response")

    @hookimpl
    def upstream_request(self, exchange, request):
        self.log.append(f"{self.name}.upstream_request")

    @hookimpl
    def on_chunk(self, chunk):
        if chunk.is_done:
            self.log.append(f"{self.name}.on_chunk(done)")

    @hookimpl
    def exchange_done(self, exchange):
        self.log.append(f"{self.name}.exchange_done")
        self.done.append(exchange)


@pytest.mark.parametrize("order", [["a", "b"], ["b", "a"]])
async def test_hooks_run_in_config_order(upstream, gateway_factory, order):
    log: list[str] = []
    plugins = {n: Tracer(n, log) for n in order}
    gw = await gateway_factory(config_for(upstream, pipeline=[*order, "router"]), plugins=plugins)
    await read_stream(gw.base_url + "/chat/completions", STREAM)
    first, second = order
    assert log == [f"{p}.{h}" for h in ("authenticate", "check_request", "cached_response", "upstream_request",
                                        "on_chunk(done)", "exchange_done") for p in (first, second)]


class Boom:
    def __init__(self, hook: str) -> None:
        self.hook = hook

    @hookimpl
    def check_request(self, exchange):
        if self.hook == "check_request":
            raise ValueError("bug in plugin")

    @hookimpl
    def select_route(self, exchange):
        if self.hook == "select_route":
            raise RuntimeError("bug in a router")

    @hookimpl
    def on_chunk(self, exchange, chunk):
        if self.hook == "on_chunk" and (chunk.json or {}).get("choices", [{}])[0].get("delta", {}).get("content") == "b":
            raise KeyError("bug per chunk")


async def test_plugin_exception_fails_closed_with_500(upstream, gateway_factory, capsys):
    tracer = Tracer("t", [])
    gw = await gateway_factory(config_for(upstream, pipeline=["boom", "t", "router"]),
                               plugins={"boom": Boom("check_request"), "t": tracer})
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.base_url + "/chat/completions", json=CHAT) as resp:
            assert resp.status == 500
            err = (await resp.json())["error"]
    assert err["code"] == "plugin_error" and "'boom'" in err["message"]
    assert upstream.requests == []
    assert [e.outcome for e in tracer.done] == [Outcome.ERROR]


async def test_a_failing_synchronous_router_fails_closed_with_500(upstream, gateway_factory):
    """select_route is walked without a coroutine when no implementation awaits: it still fails closed."""
    tracer = Tracer("t", [])
    gw = await gateway_factory(config_for(upstream, pipeline=["t", "boom", "router"]),
                               plugins={"boom": Boom("select_route"), "t": tracer})
    assert not gw.current.pipeline.select_route_awaits
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.base_url + "/chat/completions", json=CHAT) as resp:
            assert resp.status == 500
            err = (await resp.json())["error"]
    assert err["code"] == "plugin_error" and "'boom'" in err["message"] and "select_route" in err["message"]
    assert upstream.requests == []
    assert [e.outcome for e in tracer.done] == [Outcome.ERROR]


async def test_on_chunk_exception_mid_stream_ends_with_error_event(upstream, gateway_factory):
    upstream.script = Script(texts=["a", "b", "c"])
    gw = await gateway_factory(config_for(upstream, pipeline=["boom", "router"]), plugins={"boom": Boom("on_chunk")})
    status, _, events = await read_stream(gw.base_url + "/chat/completions", STREAM)
    objs = data_events(events)
    assert status == 200 and content_of(events) == "a"
    assert objs[-1] == "[DONE]" and objs[-2]["error"]["code"] == "plugin_error"


class Rewriter:
    """Upper-cases content, drops chunks with 'x', holds back one chunk and releases it at [DONE]."""

    def __init__(self) -> None:
        self.held: list[Chunk] = []

    @hookimpl
    def on_chunk(self, exchange, chunk):
        data = chunk.json
        if chunk.is_done:
            released, self.held = self.held, []
            return [*released, chunk]
        if not data or not data.get("choices"):
            return None
        delta = data["choices"][0]["delta"]
        text = delta.get("content") or ""
        if text == "x":
            return []
        if text == "hold":
            self.held.append(chunk)
            return []
        delta["content"] = text.upper()
        chunk.set_json(data)
        return None


async def test_on_chunk_rewrites_drops_and_holds(upstream, gateway_factory):
    upstream.script = Script(texts=["a", "x", "hold", "b"])
    gw = await gateway_factory(config_for(upstream, pipeline=["rw", "router"]), plugins={"rw": Rewriter()})
    _, _, events = await read_stream(gw.base_url + "/chat/completions", STREAM)
    assert content_of(events) == "ABhold"


class Stopper:
    @hookimpl
    def on_chunk(self, chunk):
        if chunk.json and "forbidden" in str(chunk.json):
            raise StopStream("banned word")


async def test_stop_stream_ends_cleanly_with_finish_reason(upstream, gateway_factory):
    upstream.script = Script(texts=["fine ", "forbidden", " more"])
    rec = Tracer("r", [])
    gw = await gateway_factory(config_for(upstream, pipeline=["r", "stop", "router"]),
                               plugins={"stop": Stopper(), "r": rec})
    client = openai_client(gw.base_url)
    stream = await client.chat.completions.create(model="m", messages=CHAT["messages"], stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "fine "
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert chunks[-1].id == "chatcmpl-scripted"
    await client.close()
    await asyncio.sleep(0.05)
    assert rec.done[0].outcome == Outcome.STOPPED


@pytest.mark.parametrize("include_usage", [True, False])
async def test_a_stopped_stream_still_ends_with_the_usage_chunk_asked_for(upstream, gateway_factory, include_usage):
    """The upstream never counted the stopped answer: the usage is estimated as the rate limiter estimates it (the
    prompt by rule of thumb, a token per event sent), recorded and tagged ``usage_estimated``, and sent to a client
    that asked for ``include_usage``, as OpenAI sends a usage chunk after a content filter stops an answer."""
    upstream.script = Script(texts=["fine ", "forbidden", " more"])
    rec = Tracer("r", [])
    gw = await gateway_factory(config_for(upstream, pipeline=["r", "stop", "router"]),
                               plugins={"stop": Stopper(), "r": rec})
    client = openai_client(gw.base_url)
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    stream = await client.chat.completions.create(model="m", messages=CHAT["messages"], stream=True, **extra)
    chunks = [c async for c in stream]
    await client.close()
    await asyncio.sleep(0.05)
    done = rec.done[0]
    assert done.outcome == Outcome.STOPPED and "usage_estimated" in done.tags
    assert done.usage.completion_tokens == done.chunks_sent >= 2  # role + "fine " at least
    assert done.usage.prompt_tokens > 0
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish[-1].choices[0].finish_reason == "content_filter"
    if include_usage:
        assert chunks[-1].choices == [] and chunks[-1].id == finish[-1].id
        assert chunks[-1].usage.prompt_tokens == done.usage.prompt_tokens
        assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens
    else:
        assert all(c.usage is None for c in chunks)


class Cache:
    def __init__(self, reply: Reply) -> None:
        self.reply = reply

    @hookimpl
    def cached_response(self, exchange):
        return self.reply


async def test_cached_response_short_circuits_both_ways(upstream, gateway_factory):
    chunks = [{"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": [{"index": 0, "delta": {"role": "assistant", "content": t}, "finish_reason": None}]}
              for t in ("cac", "hed")]
    chunks.append({**chunks[0], "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    gw = await gateway_factory(config_for(upstream, pipeline=["cache", "router"]),
                               plugins={"cache": Cache(Reply(chunks=chunks))})
    _, _, events = await read_stream(gw.base_url + "/chat/completions", STREAM)
    assert content_of(events) == "cached" and data_events(events)[-1] == "[DONE]"
    client = openai_client(gw.base_url)
    answer = await client.chat.completions.create(model="m", messages=CHAT["messages"])
    assert answer.choices[0].message.content == "cached" and answer.choices[0].finish_reason == "stop"
    await client.close()
    assert upstream.requests == []


class Refuser:
    @hookimpl
    def check_request(self, exchange):
        if exchange.json["messages"][0]["content"] == "refuse":
            return Reply(body={"id": "r", "object": "chat.completion", "created": 1, "model": exchange.model,
                               "choices": [{"index": 0, "message": {"role": "assistant", "content": "No."},
                                            "finish_reason": "stop"}]})
        if exchange.json["messages"][0]["content"] == "reject":
            raise GatewayError(403, "not for you", code="forbidden")


async def test_check_request_reply_and_rejection(upstream, gateway_factory):
    gw = await gateway_factory(config_for(upstream, pipeline=["ref", "router"]), plugins={"ref": Refuser()})
    refuse = {**STREAM, "messages": [{"role": "user", "content": "refuse"}]}
    _, _, events = await read_stream(gw.base_url + "/chat/completions", refuse)
    assert content_of(events) == "No."
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.base_url + "/chat/completions",
                          json={**CHAT, "messages": [{"role": "user", "content": "reject"}]}) as resp:
            assert resp.status == 403 and (await resp.json())["error"]["code"] == "forbidden"
    assert upstream.requests == []


class Auth:
    @hookimpl
    def authenticate(self, exchange):
        if exchange.headers.get("Authorization") != "Bearer good":
            raise GatewayError(401, "Incorrect API key provided", code="invalid_api_key")
        return Principal(name="alice")


class Editor:
    def __init__(self) -> None:
        self.principals: list = []

    @hookimpl
    def upstream_request(self, exchange, request):
        self.principals.append(exchange.principal.name)
        request.json["temperature"] = 0
        request.headers["X-Team"] = "blue"

    @hookimpl
    def on_response(self, body):
        body["choices"][0]["message"]["content"] += " (edited)"


async def test_authenticate_upstream_request_and_on_response(upstream, gateway_factory):
    editor = Editor()
    gw = await gateway_factory(config_for(upstream, pipeline=["auth", "edit", "router"]),
                               plugins={"auth": Auth(), "edit": editor})
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.base_url + "/chat/completions", json=CHAT) as resp:
            assert resp.status == 401
        async with s.post(gw.base_url + "/chat/completions", json=CHAT,
                          headers={"Authorization": "Bearer good"}) as resp:
            assert (await resp.json())["choices"][0]["message"]["content"] == "Hello, world! (edited)"
    assert editor.principals == ["alice"]
    assert upstream.requests[-1]["temperature"] == 0 and upstream.headers[-1]["X-Team"] == "blue"


@pytest.mark.parametrize("case", ["ok", "stream_ok", "upstream_error", "rejected", "timeout", "midstream_cut"])
async def test_exchange_done_runs_exactly_once(upstream, gateway_factory, case):
    tracer = Tracer("t", [])
    opts = {"timeout": 0.3} if case == "timeout" else {}
    gw = await gateway_factory(config_for(upstream, pipeline=["t", "router"], **opts), plugins={"t": tracer})
    body = STREAM if case in ("stream_ok", "midstream_cut") else CHAT
    if case == "upstream_error":
        upstream.script = Script(status=500)
    if case == "rejected":
        body = {"model": "m"}
    if case == "timeout":
        upstream.script = Script(first_delay=2)
    if case == "midstream_cut":
        upstream.script = Script(texts=["a", "b", "c"], cut_after=1)
    await read_stream(gw.base_url + "/chat/completions", body)
    await asyncio.sleep(0.05)
    expected = {"ok": Outcome.OK, "stream_ok": Outcome.OK, "upstream_error": Outcome.ERROR,
                "rejected": Outcome.REJECTED, "timeout": Outcome.TIMEOUT, "midstream_cut": Outcome.ERROR}[case]
    assert [e.outcome for e in tracer.done] == [expected]
    done = tracer.done[0]
    assert done.ended is not None and done.ended >= done.started
    if case in ("ok", "stream_ok"):
        assert done.usage.total_tokens == 11 and done.provider == "up0"


async def test_plugins_load_by_dotted_path_with_typed_config(upstream, gateway_factory):
    from tests.sample_plugins import audit

    audit.CALLS.clear()
    pipeline = [PipelineEntry("tests.sample_plugins.audit:Audit", {"level": "debug"}),
                PipelineEntry("tests.sample_plugins.audit"), "router"]
    gw = await gateway_factory(config_for(upstream, pipeline=pipeline))
    await read_stream(gw.base_url + "/chat/completions", CHAT)
    assert audit.CALLS == ["audit:debug", "module"]


class SlowDone:
    def __init__(self) -> None:
        self.finished = 0

    @hookimpl
    async def exchange_done(self, exchange):
        await asyncio.sleep(0.3)  # e.g. a Redis round trip, while the client hangs up
        self.finished += 1


async def test_exchange_done_survives_the_client_hanging_up(upstream, gateway_factory):
    slow, after = SlowDone(), Tracer("after", [])
    gw = await gateway_factory(config_for(upstream, pipeline=["slow", "after", "router"]),
                               plugins={"slow": slow, "after": after})
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s:
        async with s.post(gw.base_url + "/chat/completions", json=CHAT) as resp:
            assert (await resp.json())["choices"][0]["message"]["content"] == "Hello, world!"
    for _ in range(100):  # bounded: 2 s
        if after.done:
            break
        await asyncio.sleep(0.02)
    assert slow.finished == 1 and len(after.done) == 1


class BodyCensor:
    @hookimpl
    def on_response(self, body):
        if "world" in body["choices"][0]["message"]["content"]:
            raise StopStream("no worlds here")


@pytest.mark.parametrize("ingress", ["openai", "anthropic"])
async def test_on_response_stop_gives_a_content_filter_answer(upstream, gateway_factory, ingress):
    rec = Tracer("r", [])
    gw = await gateway_factory(config_for(upstream, pipeline=["r", "censor", "router"]),
                               plugins={"censor": BodyCensor(), "r": rec})
    async with aiohttp.ClientSession() as s:
        if ingress == "openai":
            async with s.post(gw.base_url + "/chat/completions", json=CHAT) as resp:
                body = await resp.json()
            assert resp.status == 200
            assert body["choices"][0]["finish_reason"] == "content_filter"
            assert body["choices"][0]["message"]["content"] is None
        else:
            async with s.post(gw.url + "/v1/messages", json={"model": "m", "max_tokens": 5,
                                                             "messages": [{"role": "user", "content": "x"}]}) as resp:
                body = await resp.json()
            assert resp.status == 200 and body["type"] == "message" and body["stop_reason"] == "refusal"
    await asyncio.sleep(0.05)
    assert [(e.outcome, e.status) for e in rec.done] == [(Outcome.STOPPED, 200)]


class SystemPrompt:
    """Rewrites the request in check_request by assigning a new body."""

    @hookimpl
    def check_request(self, exchange):
        exchange.json = {**exchange.json, "messages": [{"role": "system", "content": "Be brief."},
                                                       *exchange.json["messages"]]}


@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_rewritten_in_check_request_is_what_the_upstream_gets(upstream, gateway_factory, stream):
    gw = await gateway_factory(config_for(upstream, pipeline=["system", "router"]), {"system": SystemPrompt()})
    client = openai_client(gw.base_url)
    if stream:
        async for _ in await client.chat.completions.create(model="m", messages=CHAT["messages"], stream=True):
            pass
    else:
        await client.chat.completions.create(model="m", messages=CHAT["messages"])
    await client.close()
    sent = upstream.requests[0]
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, *CHAT["messages"]]
    assert sent["model"] == "m" and bool(sent.get("stream")) is stream
