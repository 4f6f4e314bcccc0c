"""The upstream client: no state shared between clients (cookies), and the usage of non-stream answers read
right wherever the upstream puts it."""
from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy import hookimpl
from proxy.openai_format import NOT_TRAILING, trailing_usage
from proxy.testing import config_for, start_server
from tests.helpers import CHAT, read_stream


class Upstream:
    """An OpenAI-compatible upstream answering ``bodies`` in turn; records each request's ``Cookie`` header."""

    def __init__(self, bodies: list[bytes], set_cookie: bool = False) -> None:
        self.bodies = bodies
        self.set_cookie = set_cookie
        self.cookies: list[str | None] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> "Upstream":
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        self.runner, self.port = await start_server(app, "127.0.0.1", 0)
        return self

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.cookies.append(request.headers.get("Cookie"))
        n = len(self.cookies)
        headers = {"Set-Cookie": f"session=client{n}; Path=/"} if self.set_cookie else {}
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", **headers})
            await resp.prepare(request)
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                     "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\ndata: [DONE]\n\n")
            await resp.write_eof()
            return resp
        return web.Response(body=self.bodies[(n - 1) % len(self.bodies)], content_type="application/json",
                            headers=headers)

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


class UsageRecorder:
    def __init__(self) -> None:
        self.usages: list[Any] = []

    @hookimpl
    def exchange_done(self, exchange):
        self.usages.append(exchange.usage)


def _answer(**extra: Any) -> bytes:
    return orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": "hi"}}], **extra})


async def test_cookies_an_upstream_sets_never_reach_other_clients(gateway_factory):
    """A provider (or the load balancer in front of it) setting a cookie must not see it come back on the
    requests of other clients: the gateway keeps no cookie jar. ``localhost``, not an IP address: aiohttp's
    default jar ignores cookies of IP addresses, and would hide the leak from this test."""
    up = await Upstream([_answer()], set_cookie=True).start()
    try:
        gw = await gateway_factory(config_for(f"http://localhost:{up.port}/v1"))
        async with aiohttp.ClientSession() as s:
            for _ in range(2):
                async with s.post(gw.base_url + "/chat/completions", json=CHAT) as r:
                    assert r.status == 200
                    assert "Set-Cookie" not in r.headers  # nor are upstream cookies handed to the client
        await read_stream(gw.base_url + "/chat/completions", {**CHAT, "stream": True})
        assert up.cookies == [None, None, None]
    finally:
        await up.close()


USAGE = {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}


@pytest.mark.parametrize("body, expected", [
    # Where OpenAI puts it: the last member, read without parsing the rest.
    (_answer(usage=USAGE), (12, 7, 19)),
    # First, not last: the body is parsed whole.
    (orjson.dumps({"usage": USAGE, "id": "x", "choices": []}), (12, 7, 19)),
    # A nested object with a "usage" key of its own after the real one: not mistaken for it.
    (_answer(usage=USAGE, x_meta={"usage": {"prompt_tokens": 1000, "completion_tokens": 1000}}), (12, 7, 19)),
    # The answer's text talks about "usage": escaped inside a string, never a key.
    (orjson.dumps({"choices": [{"message": {"content": 'say {"usage": {"prompt_tokens": 99}}'}}]}), None),
    # Extra usage details (nested objects) and pretty-printing with a trailing newline.
    (orjson.dumps({"id": "x", "usage": {**USAGE, "prompt_tokens_details": {"cached_tokens": 3}}},
                  option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE), (12, 7, 19)),
    (_answer(usage=None), None),
])
async def test_usage_of_a_non_stream_answer_is_recorded_wherever_it_is(gateway_factory, body, expected):
    up = await Upstream([body]).start()
    try:
        rec = UsageRecorder()
        gw = await gateway_factory(config_for(f"http://127.0.0.1:{up.port}/v1", pipeline=["rec", "router"]),
                                   plugins={"rec": rec})
        async with aiohttp.ClientSession() as s:
            async with s.post(gw.base_url + "/chat/completions", json=CHAT) as r:
                assert r.status == 200
                assert await r.read() == body  # the answer itself passes untouched
        for _ in range(100):
            if rec.usages:
                break
            await asyncio.sleep(0.01)
        usage = rec.usages[0]
        got = None if usage is None else (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)
        assert got == expected
    finally:
        await up.close()


@pytest.mark.parametrize("body", [
    b'{"a":{"usage":{"p":1}}}',  # nested: its object's "}" stands between the value and the end
    b'{"usage":{"p":1},"x":{"usage":5}}',
    b'{"c":"say \\"usage\\": 1"}',  # inside a string
    b'{"tags":["usage"],"b":1}',  # a string value, not a key
    b'{"usage":',  # truncated
    b'"usage"',
])
def test_trailing_usage_declines_what_it_cannot_be_sure_of(body):
    assert trailing_usage(body) is NOT_TRAILING


def test_trailing_usage_reads_the_last_member():
    assert trailing_usage(b'{"a":1,"usage" : {"prompt_tokens":1,"d":{"x":2}}}\n') == {"prompt_tokens": 1,
                                                                                       "d": {"x": 2}}
    assert trailing_usage(b'{"a":1,"usage":null}') is None
