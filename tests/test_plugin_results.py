"""What hooks return is checked: a wrong type fails closed as a plugin error naming the plugin (never as a broken
answer blamed on the provider, which would open its circuit for every client); ``[DONE]`` is the gateway's to
write whatever ``on_chunk`` hooks return; an ``on_response`` stop keeps the endpoint's shape and the usage."""
from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest

from proxy import Chunk, Outcome, Route, StopStream, hookimpl
from proxy.breaker import CLOSED
from proxy.testing import config_for
from tests.conftest import openai_client
from tests.helpers import CHAT, Recorder, content_of, data_events, read_stream

STREAM = {**CHAT, "stream": True}


class WrongChunkResult:
    """Returns ``what`` instead of a list of chunks, for requests whose ``user`` is "bad"."""

    def __init__(self, what: str) -> None:
        self.what = what

    @hookimpl
    def on_chunk(self, exchange, chunk):
        if exchange.json.get("user") != "bad":
            return None
        return chunk if self.what == "chunk" else [chunk.json or {}]


@pytest.mark.parametrize("what", ["chunk", "list of dicts"])
async def test_a_wrong_on_chunk_result_is_a_plugin_error_not_a_provider_fault(upstream, gateway_factory, what):
    rec = Recorder()
    gw = await gateway_factory(config_for(upstream, pipeline=["rec", "wrong", "router"]),
                               plugins={"wrong": WrongChunkResult(what), "rec": rec})
    async with openai_client(gw.base_url) as client:
        for _ in range(8):  # more than the breaker's failure threshold
            with pytest.raises(openai.InternalServerError) as info:
                stream = await client.chat.completions.create(model="m", messages=CHAT["messages"], stream=True,
                                                              user="bad")
                async for _chunk in stream:
                    pass
            assert info.value.body["code"] == "plugin_error"
            assert "'wrong'" in info.value.body["message"] and "on_chunk" in info.value.body["message"]
        stream = await client.chat.completions.create(model="m", messages=CHAT["messages"], stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "Hello, world!"  # the provider was never blamed
    assert {b.current() for b in gw.current.breakers.values()} == {CLOSED}
    await asyncio.sleep(0.05)
    assert [(e.outcome, e.status, e.error.code) for e in rec.done[:8]] == [(Outcome.ERROR, 500, "plugin_error")] * 8
    assert all("error" not in attempt for e in rec.done for attempt in e.attempts)


class WrongResults:
    def __init__(self, hook: str, result: object) -> None:
        self.hook, self.result = hook, result

    @hookimpl
    def check_request(self, exchange):
        return self.result if self.hook == "check_request" else None

    @hookimpl
    def select_route(self, exchange):
        return self.result if self.hook == "select_route" else None

    @hookimpl
    async def authenticate(self, exchange):
        return self.result if self.hook == "authenticate" else None


@pytest.mark.parametrize("hook,result", [
    ("check_request", "refused"), ("check_request", True), ("authenticate", "alice"),
    ("select_route", [("up0", "m")]), ("select_route", Route("up0", "m")), ("select_route", "up0"),
])
async def test_a_wrong_hook_result_fails_closed_naming_the_plugin(upstream, gateway_factory, hook, result):
    gw = await gateway_factory(config_for(upstream, pipeline=["odd", "router"]),
                               plugins={"odd": WrongResults(hook, result)})
    async with openai_client(gw.base_url) as client:
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as info:
                await client.chat.completions.create(model="m", messages=CHAT["messages"], stream=stream)
            assert info.value.body == {"message": f"internal error in plugin 'odd' ({hook})", "type": "server_error",
                                       "param": None, "code": "plugin_error"}
    assert upstream.requests == []


async def test_routes_may_come_as_a_tuple(upstream, gateway_factory):
    gw = await gateway_factory(config_for(upstream, pipeline=["odd", "router"]),
                               plugins={"odd": WrongResults("select_route", (Route("up0", "m"),))})
    async with openai_client(gw.base_url) as client:
        answer = await client.chat.completions.create(model="x", messages=CHAT["messages"])
    assert answer.choices[0].message.content == "Hello, world!" and upstream.requests[-1]["model"] == "m"


class DoneHandling:
    """``mode``: "drop" returns [] for [DONE]; "hold" holds every chunk back and releases them at [DONE] without
    returning [DONE]; "early" answers the first content chunk with [DONE] in its place."""

    def __init__(self, mode: str) -> None:
        self.mode, self.held = mode, []

    @hookimpl
    def on_chunk(self, chunk):
        if self.mode == "drop":
            return [] if chunk.is_done else None
        if self.mode == "hold":
            if chunk.is_done:
                held, self.held = self.held, []
                return held
            self.held.append(chunk)
            return []
        if not chunk.is_done and "Hello" in chunk.data:
            return [chunk, Chunk(b"data: [DONE]")]
        return None


@pytest.mark.parametrize("mode", ["drop", "hold", "early"])
async def test_done_is_written_once_and_last_whatever_hooks_return(upstream, gateway_factory, mode):
    gw = await gateway_factory(config_for(upstream, pipeline=["done", "router"]),
                               plugins={"done": DoneHandling(mode)})
    status, _, events = await read_stream(gw.base_url + "/chat/completions", STREAM)
    data = data_events(events)
    assert status == 200 and content_of(events) == "Hello, world!"
    assert data.count("[DONE]") == 1 and data[-1] == "[DONE]"
    assert data[-2]["choices"][0]["finish_reason"] == "stop"


class Refuse:
    @hookimpl
    def on_response(self, body):
        raise StopStream("content_filter")


@pytest.mark.parametrize("path,obj", [("/completions", "text_completion"), ("/chat/completions", "chat.completion")])
async def test_an_answer_stopped_in_on_response_keeps_its_shape_and_usage(upstream, gateway_factory, path, obj):
    rec = Recorder()
    gw = await gateway_factory(config_for(upstream, pipeline=["rec", "refuse", "router"]),
                               plugins={"refuse": Refuse(), "rec": rec})
    body = {"model": "m", "prompt": "Say hello"} if obj == "text_completion" else CHAT
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.base_url + path, json=body) as resp:
            answer = await resp.json()
    assert resp.status == 200
    assert answer["object"] == obj and answer["id"] == "chatcmpl-scripted" and answer["model"] == body["model"]
    assert answer["usage"] == {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "content_filter"
    assert (choice["text"] == "" and "message" not in choice) if obj == "text_completion" else (
        choice["message"] == {"role": "assistant", "content": None})
    async with openai_client(gw.base_url) as client:  # the SDK reads it as its type
        if obj == "text_completion":
            parsed = await client.completions.create(model="m", prompt="Say hello")
            assert parsed.choices[0].text == "" and parsed.usage.total_tokens == 11
        else:
            parsed = await client.chat.completions.create(model="m", messages=CHAT["messages"])
            assert parsed.choices[0].message.content is None and parsed.usage.total_tokens == 11
    await asyncio.sleep(0.05)
    assert [(e.outcome, e.status, e.usage.total_tokens) for e in rec.done] == [(Outcome.STOPPED, 200, 11)] * 2


class StopAfterFirstText:
    @hookimpl
    def on_chunk(self, exchange, chunk):
        if not chunk.is_done and exchange.chunks_sent >= 2:
            raise StopStream("enough", finish_reason="content_filter")


@pytest.mark.parametrize("endpoint", ["completions", "chat.completions"])
async def test_a_stopped_stream_ends_in_its_own_shape_for_every_choice(gateway_factory, endpoint):
    """``/v1/completions`` ends with a ``text_completion`` chunk (the SDK reads ``choice.text``), and every one
    of ``n`` choices gets its ``finish_reason``."""
    import attrs

    from proxy.config.load import load_config
    from proxy.config.schema import PipelineEntry

    config = attrs.evolve(load_config(env={}), pipeline=(PipelineEntry("stop"), PipelineEntry("router")))
    gw = await gateway_factory(config, plugins={"stop": StopAfterFirstText()})
    async with openai_client(gw.base_url) as client:
        if endpoint == "completions":
            stream = await client.completions.create(model="gpt-4o-mini", prompt="Once", stream=True, n=2,
                                                     max_tokens=30)
            chunks = [c async for c in stream]
            assert all(c.object == "text_completion" for c in chunks)
            "".join(ch.text for c in chunks for ch in c.choices)  # every choice has its text (a str)
        else:
            stream = await client.chat.completions.create(model="gpt-4o-mini", messages=CHAT["messages"],
                                                          stream=True, n=2, max_tokens=30)
            chunks = [c async for c in stream]
    final = chunks[-1]
    assert sorted((ch.index, ch.finish_reason) for ch in final.choices) == [(0, "content_filter"),
                                                                            (1, "content_filter")]
