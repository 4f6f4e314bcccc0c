"""An upstream that closes an idle keep-alive connection just as the gateway sends a request on it (uvicorn, and so
vLLM, closes them after 5 s): the request gets no answer on that connection, and the gateway sends it once more on
a new one. The upstream here is a raw HTTP/1.1 server on 127.0.0.1 that answers the first request of each
connection with keep-alive and closes the connection, unanswered, at the second."""
from __future__ import annotations

import asyncio

import aiohttp
import orjson

from proxy.testing import config_for
from tests.helpers import CHAT

ANSWER = orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": "hi"}}],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})
EVENTS = (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
          b'"delta":{"content":"hi"},"finish_reason":null}]}\n\n'
          b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
          b'"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n')


class OneRequestPerConnection:
    """Answers the first request of a connection (keep-alive advertised), reads the second and closes."""

    def __init__(self, answer_none: bool = False) -> None:
        self.requests = 0  # requests read, answered or not
        self.connections = 0
        self.answer_none = answer_none
        self.server: asyncio.AbstractServer | None = None

    @property
    def base_url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"

    async def start(self) -> "OneRequestPerConnection":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                body = orjson.loads(await reader.readexactly(length))
                self.requests += 1
                if served or self.answer_none:
                    break  # the keep-alive timeout ran out as this request came in: closed, unanswered
                served += 1
                if body.get("stream"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n"
                                 b"Connection: keep-alive\r\n\r\n%s" % (len(EVENTS), EVENTS))
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                                 b"Connection: keep-alive\r\n\r\n%s" % (len(ANSWER), ANSWER))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def _ask(session: aiohttp.ClientSession, url: str, stream: bool) -> tuple[int, bytes]:
    async with session.post(url + "/chat/completions", json={**CHAT, "stream": stream}) as resp:
        return resp.status, await resp.read()


async def test_a_request_on_a_connection_the_upstream_just_closed_is_sent_again_on_a_new_one(gateway_factory):
    upstream = await OneRequestPerConnection().start()
    try:
        gw = await gateway_factory(config_for(upstream.base_url))  # retry_attempts: 0, one provider
        async with aiohttp.ClientSession() as session:
            for stream in (False, True, False):
                status, body = await _ask(session, gw.base_url, stream)
                assert status == 200, body
                assert b'"hi"' in body and (b"[DONE]" in body) == stream
        # every request after the first met the pooled connection closed and went out again on a new one
        assert upstream.requests == 5 and upstream.connections == 3
    finally:
        await upstream.close()


async def test_an_upstream_that_closes_every_request_unanswered_is_asked_twice_then_reported(gateway_factory):
    upstream = await OneRequestPerConnection(answer_none=True).start()
    try:
        gw = await gateway_factory(config_for(upstream.base_url))
        async with aiohttp.ClientSession() as session:
            status, body = await _ask(session, gw.base_url, False)
        assert status == 502
        assert orjson.loads(body)["error"]["code"] == "upstream_connect_error"
        assert upstream.requests == 2
    finally:
        await upstream.close()
