"""The azure_openai adapter: deployment URLs, api-version and the api-key header, against a real server."""
from __future__ import annotations

import orjson
from aiohttp import web

from proxy.config.schema import Config, PipelineEntry, ProviderConfig
from proxy.web_app import start_server
from tests.conftest import openai_client


async def test_azure_deployment_url_version_and_key(gateway_factory, monkeypatch):
    seen = []

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append((request.path, dict(request.query), request.headers.get("api-key"),
                     request.headers.get("Authorization"), body))
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            chunk = {"id": "a", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4",
                     "choices": [{"index": 0, "delta": {"content": "azure"}, "finish_reason": "stop"}]}
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\ndata: [DONE]\n\n")
            return resp
        return web.json_response({"id": "a", "object": "chat.completion", "created": 1, "model": "gpt-4",
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "azure"},
                                               "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    app = web.Application()
    app.router.add_post("/openai/deployments/{deployment}/chat/completions", handler)
    app.router.add_post("/openai/deployments/{deployment}/embeddings", handler)
    runner, port = await start_server(app, "127.0.0.1", 0)
    monkeypatch.setenv("AZURE_OPENAI_KEY", "az-secret")
    provider = ProviderConfig(name="azure", type="azure_openai", base_url=f"http://127.0.0.1:{port}/",
                              api_key_env="AZURE_OPENAI_KEY", api_version="2024-06-01",
                              models=("gpt-4", "gpt-35-turbo"), deployments={"gpt-35-turbo": "prod-35"})
    gw = await gateway_factory(Config(providers=(provider,), pipeline=(PipelineEntry("router"),)))
    client = openai_client(gw.base_url)
    try:
        answer = await client.chat.completions.create(model="gpt-35-turbo", messages=[{"role": "user", "content": "x"}])
        assert answer.choices[0].message.content == "azure"
        stream = await client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}],
                                                      stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "azure"
    finally:
        await client.close()
        await runner.cleanup()
    assert seen[0][:4] == ("/openai/deployments/prod-35/chat/completions", {"api-version": "2024-06-01"},
                           "az-secret", None)
    assert seen[1][0] == "/openai/deployments/gpt-4/chat/completions"
    assert seen[1][4]["stream_options"] == {"include_usage": True}
