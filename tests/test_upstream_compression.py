"""An upstream (or a proxy in front of it) that compresses its answers although the gateway asks for
``Accept-Encoding: identity``: streams, whole answers, model lists and error bodies reach the client decoded.
A real aiohttp upstream on 127.0.0.1 writing gzip; the official ``openai`` SDK as the client."""
from __future__ import annotations

import gzip
import zlib

import openai
import orjson
import pytest
from aiohttp import web

from proxy.testing import config_for
from proxy.web_app import start_server
from tests.conftest import openai_client
from tests.helpers import CHAT

ANSWER = {"id": "chatcmpl-z", "object": "chat.completion", "created": 1700000000, "model": "gpt-4o-mini",
          "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "zipped"}}],
          "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}


def chunk(delta: dict, finish: str | None = None) -> bytes:
    return b"data: " + orjson.dumps({"id": "chatcmpl-z", "object": "chat.completion.chunk", "created": 1700000000,
                                     "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": delta,
                                                                          "finish_reason": finish}]}) + b"\n\n"


class GzipUpstream:
    def __init__(self) -> None:
        self.encoding = "gzip"
        self.accept_encodings: list[str | None] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def compressor(self):  # type: ignore[no-untyped-def]
        return zlib.compressobj(wbits=31 if self.encoding == "gzip" else 15)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.accept_encodings.append(request.headers.get("Accept-Encoding"))
        body = await request.json()
        if body["model"] == "missing":
            return web.Response(status=404, body=gzip.compress(orjson.dumps({"error": {
                "message": "The model `missing` does not exist", "type": "invalid_request_error", "param": None,
                "code": "model_not_found"}})), headers={"Content-Type": "application/json",
                                                        "Content-Encoding": "gzip"})
        if not body.get("stream"):
            return web.Response(body=gzip.compress(orjson.dumps(ANSWER)),
                                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Content-Encoding": self.encoding})
        await resp.prepare(request)
        packer = self.compressor()
        for event in (chunk({"role": "assistant", "content": ""}), chunk({"content": "zip"}),
                      chunk({"content": "ped"}), chunk({}, "stop"), b"data: [DONE]\n\n"):
            await resp.write(packer.compress(event) + packer.flush(zlib.Z_SYNC_FLUSH))  # each event as it comes
        await resp.write(packer.flush())
        await resp.write_eof()
        return resp

    async def models(self, request: web.Request) -> web.Response:
        return web.Response(body=gzip.compress(orjson.dumps({"object": "list", "data": [
            {"id": "zipped-model", "object": "model", "created": 1, "owned_by": "me"}]})),
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})


@pytest.fixture
async def zipping():
    up = GzipUpstream()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", up.chat)
    app.router.add_get("/v1/models", up.models)
    up.runner, up.port = await start_server(app, "127.0.0.1", 0)
    yield up
    await up.runner.cleanup()


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_compressed_answers_reach_the_client_decoded(zipping, gateway_factory, encoding):
    zipping.encoding = encoding
    gw = await gateway_factory(config_for(zipping.base_url, models=["*"]))
    client = openai_client(gw.base_url)
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=CHAT["messages"], stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "zipped"
    assert chunks[-1].choices[0].finish_reason == "stop"
    answer = await client.chat.completions.create(model="gpt-4o-mini", messages=CHAT["messages"])
    assert answer.choices[0].message.content == "zipped" and answer.usage.total_tokens == 6
    assert "zipped-model" in [m.id async for m in client.models.list()]
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="missing", messages=CHAT["messages"])
    await client.close()
    assert info.value.body["code"] == "model_not_found"
    assert set(zipping.accept_encodings) == {"identity"}  # it was asked not to
