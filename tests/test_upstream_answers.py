"""A 200 from an upstream that is not the answer asked for: a web page, a cut-off body, an error object, or a whole
answer to a stream request. Each is caught before the client sees a byte (so another route may answer) or, for a
whole answer to a stream request, relayed as the stream it stands for."""
from __future__ import annotations

from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from proxy.testing import config_for
from tests.conftest import openai_client
from tests.helpers import CHAT, CatchAllUpstream, content_of, read_stream

STREAM = {**CHAT, "stream": True}
WHOLE = {"id": "chatcmpl-whole", "object": "chat.completion", "created": 1700000000, "model": "gpt-4o-mini",
         "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "all at once"}}],
         "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}


class OddUpstream(CatchAllUpstream):
    """Answers every POST with HTTP 200, ``body`` and ``content_type``; counts the requests."""

    def __init__(self) -> None:
        self.body = b""
        self.content_type = "application/json"
        self.requests: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(orjson.loads(await request.read()))
        return web.Response(body=self.body, headers={"Content-Type": self.content_type})


@pytest.fixture
async def odd():
    up = OddUpstream()
    yield await up.start()
    await up.close()


@pytest.mark.parametrize(("body", "content_type"), [
    (b"<html><body>It works!</body></html>", "text/html"),
    (b'{"id": "chatcmpl-cut", "choices": [{"index": 0, "message": {"role": "assist', "application/json"),
    (b'[1, 2, 3]', "application/json"),
], ids=["web-page", "cut-off", "not-an-object"])
async def test_a_non_stream_200_that_is_no_answer_falls_back(odd, upstream, gateway_factory, body, content_type):
    odd.body, odd.content_type = body, content_type
    gw = await gateway_factory(config_for(odd.base_url, upstream))
    client = openai_client(gw.base_url)
    answer = await client.chat.completions.create(**CHAT)
    assert answer.choices[0].message.content == "Hello, world!"
    assert len(odd.requests) == 1 and len(upstream.requests) == 1


async def test_a_non_stream_200_that_is_no_answer_is_a_502_without_fallback(odd, gateway_factory):
    odd.body, odd.content_type = b"<html>It works!</html>", "text/html"
    gw = await gateway_factory(config_for(odd.base_url))
    async with aiohttp.ClientSession() as s, s.post(gw.base_url + "/chat/completions", json=CHAT) as resp:
        assert resp.status == 502
        err = (await resp.json())["error"]
    assert err["code"] == "upstream_error" and "not a JSON object" in err["message"]
    assert "It works" not in err["message"]


async def test_an_error_object_with_status_200_is_an_error(odd, gateway_factory):
    odd.body = orjson.dumps({"error": {"message": "model overloaded", "type": "server_error", "param": None,
                                       "code": "overloaded"}})
    gw = await gateway_factory(config_for(odd.base_url))
    client = openai_client(gw.base_url)
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(**CHAT)
    assert caught.value.status_code == 502
    assert "model overloaded" in str(caught.value)
    with pytest.raises(openai.APIStatusError) as caught:  # the same before a stream starts
        await client.chat.completions.create(**STREAM)
    assert caught.value.status_code == 502 and "model overloaded" in str(caught.value)


async def test_a_stream_request_answered_by_garbage_falls_back_before_the_first_byte(odd, upstream, gateway_factory):
    odd.body, odd.content_type = b"{not json", "application/json"
    gw = await gateway_factory(config_for(odd.base_url, upstream))
    status, headers, events = await read_stream(gw.base_url + "/chat/completions", STREAM)
    assert status == 200 and headers["x-ssegate-provider"] == "up1"
    assert b"not json" not in b"".join(events)  # none of it reached the client
    assert content_of(events) == "Hello, world!" and events[-1] == b"data: [DONE]"
    assert len(odd.requests) == 1 and len(upstream.requests) == 1


async def test_a_whole_answer_to_a_stream_request_is_relayed_as_a_stream(odd, gateway_factory):
    """An upstream that ignores "stream": true: the SDK still gets a stream, with usage only when it asked."""
    odd.body = orjson.dumps(WHOLE)
    gw = await gateway_factory(config_for(odd.base_url))
    client = openai_client(gw.base_url)
    chunks = [c async for c in await client.chat.completions.create(**STREAM)]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "all at once"
    assert chunks[-1].choices[0].finish_reason == "stop" and all(c.usage is None for c in chunks)
    chunks = [c async for c in await client.chat.completions.create(**STREAM,
                                                                    stream_options={"include_usage": True})]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    assert odd.requests[0]["stream"] is True


async def test_a_whole_completion_to_a_stream_request_is_relayed_as_one_chunk(odd, gateway_factory):
    odd.body = orjson.dumps({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
                             "choices": [{"index": 0, "text": "once upon", "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}})
    gw = await gateway_factory(config_for(odd.base_url))
    client = openai_client(gw.base_url)
    chunks = [c async for c in await client.completions.create(model="m", prompt="tell", stream=True)]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "once upon"
