"""Event streams that real OpenAI-compatible servers send, beyond the exact ``data: {...}`` of api.openai.com:
``data:`` without its space, OpenAI's and Azure's opening chunks, a stream that ends its answer and closes
without ``[DONE]``, OpenRouter's and vLLM's error events, and data that is not JSON. Each upstream is a real
aiohttp server on 127.0.0.1 writing the exact bytes under test; the clients are the official ``openai`` SDK and
a raw SSE reader."""
from __future__ import annotations

import asyncio
from typing import Any

import attrs
import openai
import orjson
import pytest
from aiohttp import web

from proxy.config.schema import PipelineEntry
from proxy.testing import config_for
from tests.conftest import openai_client
from tests.helpers import CHAT, CatchAllUpstream, Recorder, content_of, data_events, read_stream

STREAM = {**CHAT, "stream": True}


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1700000000, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}], **extra}


def event(obj: Any, prefix: bytes = b"data: ") -> bytes:
    return prefix + (obj if isinstance(obj, bytes) else orjson.dumps(obj)) + b"\n\n"


#: An answer "Hello world" as OpenAI streams it (the opening chunk has "refusal": null).
OPENAI_ROLE = chunk({"role": "assistant", "content": "", "refusal": None})
HELLO = [chunk({"content": "Hello"}), chunk({"content": " world"}), chunk(finish="stop")]
USAGE = {**chunk(), "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}}


class RawUpstream(CatchAllUpstream):
    """Streams, to each request in turn, the next of ``scripts``: a list of byte strings written one by one
    (``None``: pause ``pause`` seconds; the string ``"cut"``: close the connection)."""

    def __init__(self) -> None:
        self.scripts: list[list[Any]] = []
        self.requests = 0
        self.pause = 0.0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        script = self.scripts[min(self.requests, len(self.scripts) - 1)]
        self.requests += 1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for part in script:
            if part is None:
                await asyncio.sleep(self.pause)
            elif part == "cut":
                assert request.transport is not None
                request.transport.close()
                return resp
            else:
                await resp.write(part)
        await resp.write_eof()
        return resp


@pytest.fixture
async def raw_upstream():
    up = RawUpstream()
    yield await up.start()
    await up.close()


async def test_done_without_its_space_ends_the_stream_and_is_no_provider_fault(raw_upstream, gateway_factory):
    """``data:[DONE]`` (SSE makes the space optional) is the end of a complete answer: no truncation error, no
    second ``[DONE]``, and the circuit stays closed however many such answers come."""
    raw_upstream.scripts = [[event(OPENAI_ROLE, b"data:"), *(event(c, b"data:") for c in HELLO),
                             event(USAGE, b"data:"), b"data:[DONE]\n\n"]]
    rec = Recorder()
    config = config_for(raw_upstream.base_url, pipeline=["rec", "router"])
    gw = await gateway_factory(config, plugins={"rec": rec})
    for _ in range(6):  # past the default failure_threshold (5)
        status, _, events = await read_stream(gw.base_url + "/chat/completions",
                                              {**STREAM, "stream_options": {"include_usage": True}})
        assert status == 200
        objects = data_events(events)
        assert content_of(events) == "Hello world"
        assert objects[-1] == "[DONE]" and objects.count("[DONE]") == 1
        assert not any(isinstance(o, dict) and "error" in o for o in objects)
        assert objects[-2]["usage"]["completion_tokens"] == 2  # the usage chunk, re-spelled "data: {...}"
        assert all(ev.startswith((b"data: ", b":")) for ev in events)
    assert [e.outcome for e in rec.done] == ["ok"] * 6
    assert rec.done[-1].usage.total_tokens == 11
    assert gw.gateway.breakers["up0"].current() == "closed" and gw.gateway.breakers["up0"].failures == 0


@pytest.mark.parametrize("opening", [
    [OPENAI_ROLE],
    [{"id": "", "object": "", "created": 0, "model": "", "choices": [],
      "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]},
     chunk({"role": "assistant", "content": ""})],
], ids=["openai-role-chunk", "azure-prompt-filter-chunk"])
async def test_a_failure_right_after_the_opening_chunks_still_falls_back(raw_upstream, upstream, gateway_factory,
                                                                          opening):
    """OpenAI's opening chunk (with ``"refusal": null``) and Azure's prompt-filter chunk carry no answer: they are
    held back, so a failure right after them reaches no client and the next provider answers."""
    raw_upstream.scripts = [[*(event(c) for c in opening), "cut"]]
    gw = await gateway_factory(config_for(raw_upstream.base_url, upstream, retry_attempts=0))
    client = openai_client(gw.base_url)
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=CHAT["messages"], stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    await client.close()
    assert text == "Hello, world!"  # the second provider's whole answer, nothing of the first
    assert raw_upstream.requests == 1 and len(upstream.requests) == 1


async def test_the_first_token_timeout_is_not_met_by_a_role_chunk_or_comments(raw_upstream, upstream,
                                                                               gateway_factory):
    """vLLM sends its role chunk at once, and some servers send ``: ping`` comments while they queue: neither is
    the first token, so the first-token timeout still moves the request on."""
    raw_upstream.pause = 0.25
    raw_upstream.scripts = [[event(chunk({"role": "assistant", "content": ""})),
                             *([b": ping\n\n", None] * 12), *(event(c) for c in HELLO), b"data: [DONE]\n\n"]]
    gw = await gateway_factory(config_for(raw_upstream.base_url, upstream, retry_attempts=0, first_token_timeout=0.6,
                                          idle_timeout=10.0))
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, _, events = await read_stream(gw.base_url + "/chat/completions", STREAM)
    took = loop.time() - started
    assert status == 200 and content_of(events) == "Hello, world!"  # the second provider's
    assert len(upstream.requests) == 1
    assert took < 2.5  # not the 3 s of pings


async def test_an_answer_that_ended_then_closed_without_done_is_complete(raw_upstream, upstream, gateway_factory):
    """Some servers close right after the finish chunk (and the usage chunk), without ``[DONE]``: the answer was
    complete. It ends with ``[DONE]`` and no error, and a ``continue`` group does not append another answer."""
    raw_upstream.scripts = [[event(OPENAI_ROLE), *(event(c) for c in HELLO), event(USAGE)]]
    rec = Recorder()
    router = PipelineEntry("router", {"groups": [{"models": ["*"], "on_midstream_failure": "continue"}]})
    config = attrs.evolve(config_for(raw_upstream.base_url, upstream), pipeline=(PipelineEntry("rec"), router))
    gw = await gateway_factory(config, plugins={"rec": rec})
    status, _, events = await read_stream(gw.base_url + "/chat/completions",
                                          {**STREAM, "stream_options": {"include_usage": True}})
    objects = data_events(events)
    assert status == 200 and content_of(events) == "Hello world"
    assert objects[-1] == "[DONE]" and objects.count("[DONE]") == 1
    assert not any(isinstance(o, dict) and "error" in o for o in objects)
    assert [o["choices"][0]["finish_reason"] for o in objects if isinstance(o, dict) and o["choices"]
            and o["choices"][0]["finish_reason"]] == ["stop"]
    assert upstream.requests == []  # nobody was asked to continue
    assert rec.done[0].outcome == "ok" and rec.done[0].usage.completion_tokens == 2


async def test_a_cut_before_the_finish_chunk_is_still_a_failure(raw_upstream, gateway_factory):
    raw_upstream.scripts = [[event(OPENAI_ROLE), event(HELLO[0])]]
    status, _, events = await read_stream((await gateway_factory(config_for(raw_upstream.base_url)))
                                          .base_url + "/chat/completions", STREAM)
    objects = data_events(events)
    assert status == 200 and content_of(events) == "Hello"
    assert objects[-2]["error"]["code"] == "upstream_stream_truncated" and objects[-1] == "[DONE]"


@pytest.mark.parametrize("error_event", [
    # OpenRouter: the error inside a chunk, after its id, model and provider
    {**chunk({"content": ""}, finish="error"), "provider": "openai",
     "error": {"code": "server_error", "message": "Provider disconnected unexpectedly"}},
    # vLLM (older versions) and other OpenAI-compatible servers
    {"object": "error", "message": "Provider disconnected unexpectedly", "type": "InternalServerError",
     "param": None, "code": 500},
], ids=["openrouter-error-chunk", "vllm-error-object"])
async def test_error_events_of_other_servers_end_the_stream_as_errors(raw_upstream, gateway_factory, error_event):
    provider = {"provider": "OpenAI"} if "provider" in error_event else {}  # OpenRouter names it in every chunk
    raw_upstream.scripts = [[event({**OPENAI_ROLE, **provider}), event({**HELLO[0], **provider}), event(error_event),
                             b"data: [DONE]\n\n"]]
    rec = Recorder()
    gw = await gateway_factory(config_for(raw_upstream.base_url, pipeline=["rec", "router"]), plugins={"rec": rec})
    status, _, events = await read_stream(gw.base_url + "/chat/completions", STREAM)
    objects = data_events(events)
    assert status == 200 and content_of(events) == "Hello"
    assert objects[-2]["error"]["message"] == "Provider disconnected unexpectedly"
    assert set(objects[-2]["error"]) >= {"message", "type", "param", "code"}
    assert objects[-1] == "[DONE]"
    assert rec.done[0].outcome == "error"


async def test_an_error_event_before_any_content_of_another_server_falls_back(raw_upstream, upstream,
                                                                                gateway_factory):
    raw_upstream.scripts = [[event({"object": "error", "message": "model overloaded", "code": 503})]]
    gw = await gateway_factory(config_for(raw_upstream.base_url, upstream, retry_attempts=0))
    status, _, events = await read_stream(gw.base_url + "/chat/completions", STREAM)
    assert status == 200 and content_of(events) == "Hello, world!"


async def test_data_that_is_not_json_ends_the_stream_with_an_error_not_a_broken_sdk(raw_upstream,
                                                                                   gateway_factory):
    raw_upstream.scripts = [[event(OPENAI_ROLE), event(HELLO[0]), b"data: upstream hiccup, please wait\n\n",
                             event(HELLO[1]), b"data: [DONE]\n\n"]]
    rec = Recorder()
    gw = await gateway_factory(config_for(raw_upstream.base_url, pipeline=["rec", "router"]), plugins={"rec": rec})
    client = openai_client(gw.base_url)
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=CHAT["messages"], stream=True)
    text = []
    with pytest.raises(openai.APIError) as info:  # the SDK's own error for an in-band error event
        async for c in stream:
            text.append(c.choices[0].delta.content or "" if c.choices else "")
    await client.close()
    assert "".join(text) == "Hello"
    assert "not JSON" in str(info.value)
    assert rec.done[0].outcome == "error"


async def test_events_with_fields_and_several_data_lines_reach_the_client_as_plain_chunks(raw_upstream,
                                                                                         gateway_factory):
    first, second = orjson.dumps(HELLO[0]), orjson.dumps(HELLO[1])
    split = second.index(b'"object"')  # between two members: the data lines join into valid JSON
    raw_upstream.scripts = [[event(OPENAI_ROLE),
                             b"id: 1\nevent: message\ndata: " + first + b"\n\n",
                             b"data: " + second[:split] + b"\ndata: " + second[split:] + b"\n\n",
                             b"data: \n\n",  # empty data: dropped
                             event(HELLO[2]), b"data: [DONE]\n\n"]]
    gw = await gateway_factory(config_for(raw_upstream.base_url))
    client = openai_client(gw.base_url)
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=CHAT["messages"], stream=True)
    parts = [c async for c in stream]
    await client.close()
    assert "".join(c.choices[0].delta.content or "" for c in parts if c.choices) == "Hello world"
    assert parts[-1].choices[0].finish_reason == "stop"
