"""The request path's shortcuts, each against what it skips: the API's POST routes dispatched without aiohttp's
router, a request body taken whole when it is all here, and an upstream answer taken whole when it came with its
headers. Every request still gets what the long way gives it: the right handler, 404/405, ``Expect:
100-continue``, CORS, the size limit, and the upstream connection back in the pool."""
from __future__ import annotations

import asyncio

import aiohttp
import attrs
import orjson
from aiohttp import web

from proxy.config.schema import CorsConfig
from proxy.testing import config_for
from proxy.web_runner import GatewayRunner
from tests.helpers import CHAT, CatchAllUpstream


def _answer(content: str) -> bytes:
    return orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": content}}],
                         "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})


class PeerRecordingUpstream(CatchAllUpstream):
    """Answers each chat request whole; a request whose last message is ``"slow"`` gets a large answer written in
    two pieces 50 ms apart (so it has not all arrived with its headers). Records the client port of each request:
    one port means one pooled connection."""

    def __init__(self) -> None:
        self.ports: list[int] = []
        self.bodies: list[bytes] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.bodies.append(body)
        self.ports.append(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
        last = orjson.loads(body)["messages"][-1]["content"]
        if last != "slow":
            return web.Response(body=_answer("hi"), content_type="application/json")
        answer = _answer("z" * 300_000)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = len(answer)
        await resp.prepare(request)
        await resp.write(answer[:1000])
        await asyncio.sleep(0.05)
        await resp.write(answer[1000:])
        await resp.write_eof()
        return resp


async def _chat(session: aiohttp.ClientSession, url: str, text: str, **kwargs: object) -> tuple[int, dict]:
    body = {**CHAT, "messages": [{"role": "user", "content": text}]}
    async with session.post(url + "/v1/chat/completions", json=body, **kwargs) as resp:  # type: ignore[arg-type]
        return resp.status, await resp.json()


async def test_answers_taken_whole_leave_the_upstream_connection_pooled(gateway_factory):
    upstream = await PeerRecordingUpstream().start()
    try:
        gw = await gateway_factory(config_for(upstream.base_url))
        async with aiohttp.ClientSession() as s:
            for text in ("a", "b", "slow", "c", "slow", "d"):
                status, answer = await _chat(s, gw.url, text)
                assert status == 200
                expected = "z" * 300_000 if text == "slow" else "hi"
                assert answer["choices"][0]["message"]["content"] == expected
        assert len(upstream.ports) == 6
        assert len(set(upstream.ports)) == 1  # every answer, whole at once or not, released its connection
    finally:
        await upstream.close()


async def test_a_body_that_arrives_in_pieces_is_read_to_its_end(gateway_factory):
    upstream = await PeerRecordingUpstream().start()
    try:
        gw = await gateway_factory(config_for(upstream.base_url))
        body = orjson.dumps({**CHAT, "messages": [{"role": "user", "content": "p" * 20_000}]})
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(head + body[:100])
        await writer.drain()
        await asyncio.sleep(0.1)  # the handler has started with part of the body
        writer.write(body[100:])
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200")
        assert upstream.bodies == [body]
    finally:
        await upstream.close()


async def test_the_size_limit_holds_for_a_body_whole_or_in_pieces(upstream, gateway_factory):
    config = config_for(upstream)
    gw = await gateway_factory(attrs.evolve(config, server=attrs.evolve(config.server, max_request_size=2048)))
    body = orjson.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 3000}]})
    for pause in (0.0, 0.1):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + (body if not pause else body[:10]))
        if pause:
            await asyncio.sleep(pause)
            writer.write(body[10:])
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
        assert b'"request_too_large"' in answer
    # exactly at the limit passes
    content = "x" * (2048 - len(orjson.dumps({**CHAT, "messages": [{"role": "user", "content": ""}]})))
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/chat/completions",
                          data=orjson.dumps({**CHAT, "messages": [{"role": "user", "content": content}]}),
                          headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 200
    assert len(upstream.requests) == 1


async def test_expect_100_continue_goes_the_routed_way_and_is_answered(upstream, gateway_factory):
    gw = await gateway_factory(config_for(upstream))
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/chat/completions", json=CHAT, expect100=True) as resp:
            assert resp.status == 200
            assert (await resp.json())["object"] == "chat.completion"


async def test_routes_and_errors_are_the_routers_for_everything_else(upstream, gateway_factory):
    gw = await gateway_factory(config_for(upstream))
    async with aiohttp.ClientSession() as s:
        for method, path, status in (("GET", "/v1/chat/completions", 405), ("POST", "/v1/chat/completions/x", 404),
                                     ("POST", "/V1/chat/completions", 404), ("POST", "/v1/chat%2Fcompletions", 404),
                                     ("POST", "/v1/models", 405), ("POST", "/v1/chat/completions?api-version=1", 200),
                                     ("POST", "/chat/completions", 200), ("POST", "/v1/embeddings", 200)):
            body = {"model": "m", "input": "x"} if "embeddings" in path else CHAT
            async with s.request(method, gw.url + path, json=body) as resp:
                assert resp.status == status, (method, path)
                assert resp.headers["X-Request-ID"]


async def test_the_direct_dispatch_is_on_only_without_a_middleware(upstream, gateway_factory):
    gw = await gateway_factory(config_for(upstream))
    assert isinstance(gw.runner, GatewayRunner)
    assert gw.runner.server.request_handler.__name__ == "dispatch"  # type: ignore[union-attr]
    config = config_for(upstream)
    cors = await gateway_factory(attrs.evolve(config, cors=CorsConfig(allow_origins=("https://chat.example",))))
    assert cors.runner.server.request_handler.__name__ == "_handle"  # type: ignore[union-attr]
    async with aiohttp.ClientSession() as s:
        async with s.post(cors.url + "/v1/chat/completions", json=CHAT,
                          headers={"Origin": "https://chat.example"}) as resp:
            assert resp.status == 200
            assert resp.headers["Access-Control-Allow-Origin"] == "https://chat.example"

