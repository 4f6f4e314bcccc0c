"""``POST /v1/messages/count_tokens`` (the anthropic SDK's ``messages.count_tokens``): the gateway's estimate of
the prompt, with no upstream called; authentication, ``allowed_models``, body checks and errors in Anthropic's
format; ``exchange_done`` once; not rate-limited. And the catch-all's errors under ``/v1/messages`` (405, 404)
in Anthropic's format."""
from __future__ import annotations

import aiohttp
import anthropic
import pytest

from proxy import Outcome
from proxy.anthropic_format import from_anthropic_request
from proxy.config.schema import PipelineEntry
from proxy.testing import config_for
from proxy.tokens import estimate_prompt_tokens
from tests.helpers import Recorder

ALICE = "sk-test-alice-4f9a1c0e7b2d"  # may use gpt-4o-mini only
BOB = "sk-test-bob-93c1d0a8e5f7"  # may use everything

HI = [{"role": "user", "content": "Hi"}]
TOOLS = [{"name": "get_weather", "description": "Weather for a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]


async def start(upstream, gateway_factory, *, keys: list[str] | None = None, ratelimit: bool = False,
                recorder: Recorder | None = None):
    pipeline: list = []
    if keys is not None:
        pipeline.append(PipelineEntry("auth", {"keys_env": None, "keys": keys}))
    if ratelimit:
        pipeline.append(PipelineEntry("ratelimit", {"backend": "memory"}))
    if recorder is not None:
        pipeline.append("rec")
    pipeline.append("router")
    config = config_for(upstream, pipeline=pipeline)
    return await gateway_factory(config, plugins={"rec": recorder} if recorder is not None else None)


def client_for(gw, key: str | None = "unused") -> anthropic.AsyncAnthropic:
    if key is None:  # no credentials at all: neither x-api-key nor Authorization is sent
        return anthropic.AsyncAnthropic(base_url=gw.url, api_key=None, auth_token=None, max_retries=0,
                                        default_headers={"Authorization": anthropic.Omit()})
    return anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0)


def expected_estimate(**body) -> int:
    return estimate_prompt_tokens("chat.completions", from_anthropic_request({"model": "m", **body}))


def assert_anthropic_error(body, kind: str) -> str:
    assert body["type"] == "error" and set(body) == {"type", "error"}
    assert body["error"]["type"] == kind and set(body["error"]) == {"type", "message"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]["message"]


async def test_count_tokens_estimates_the_prompt_without_calling_the_upstream(upstream, gateway_factory):
    gw = await start(upstream, gateway_factory)
    async with client_for(gw) as client:
        raw = await client.messages.with_raw_response.count_tokens(model="claude-3-haiku", messages=HI)
        small = await raw.parse()
        longer = await client.messages.count_tokens(
            model="claude-3-haiku", messages=[{"role": "user", "content": "Hi " * 400}])
        with_system = await client.messages.count_tokens(model="claude-3-haiku", messages=HI,
                                                         system="You are a terse assistant. " * 10)
        with_system_blocks = await client.messages.count_tokens(
            model="claude-3-haiku", messages=HI, system=[{"type": "text", "text": "You are a terse assistant. " * 10}])
        with_tools = await client.messages.count_tokens(model="claude-3-haiku", messages=HI, tools=TOOLS)
        conversation = [{"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"}]},
                        {"role": "assistant", "content": [{"type": "tool_use", "id": "tu_1", "name": "get_weather",
                                                           "input": {"city": "Oslo"}}]},
                        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "tu_1",
                                                      "content": "Sunny, 21 degrees"}]}]
        tool_turns = await client.messages.count_tokens(model="claude-3-haiku", messages=conversation, tools=TOOLS)
    assert raw.http_response.status_code == 200 and raw.headers["X-Request-ID"]
    assert raw.http_response.json() == {"input_tokens": small.input_tokens}  # Anthropic's shape, nothing else
    assert isinstance(small.input_tokens, int) and small.input_tokens > 0
    assert longer.input_tokens > small.input_tokens + 250  # ~4 characters a token: 1200 characters, ~300
    assert with_system.input_tokens > small.input_tokens + 50  # the system prompt counts
    assert with_system_blocks.input_tokens == with_system.input_tokens
    assert with_tools.input_tokens > small.input_tokens  # so do the tools
    # The number is the gateway's estimate of the translated prompt, the one rate limits reserve.
    assert small.input_tokens == expected_estimate(messages=HI)
    assert with_system.input_tokens == expected_estimate(messages=HI, system="You are a terse assistant. " * 10)
    assert with_tools.input_tokens == expected_estimate(messages=HI, tools=TOOLS)
    assert tool_turns.input_tokens == expected_estimate(messages=conversation, tools=TOOLS) > with_tools.input_tokens
    assert upstream.requests == []  # answered by the gateway: no provider asked


async def test_count_tokens_checks_the_body_as_messages_does_without_max_tokens(upstream, gateway_factory):
    gw = await start(upstream, gateway_factory)
    async with client_for(gw) as client:
        # The SDK sends no max_tokens for count_tokens; /v1/messages requires it, count_tokens must not.
        assert (await client.messages.count_tokens(model="m", messages=HI)).input_tokens > 0
        bad_bodies = [
            {"model": "m"},  # messages missing
            {"messages": HI},  # model missing
            {"model": 7, "messages": HI},
            {"model": "m", "messages": "Hi"},
            {"model": "m", "messages": []},
            {"model": "m", "messages": ["Hi"]},
            {"model": "m", "messages": [{"content": "Hi"}]},  # no role
            {"model": "m", "messages": [{"role": "user", "content": ["Hi"]}]},  # a block that is not an object
            {"model": "m", "messages": HI, "tools": [{"name": "t"}, "not a tool"]},
            {"model": "m", "messages": HI, "system": 5},
        ]
        for body in bad_bodies:
            with pytest.raises(anthropic.BadRequestError) as info:
                await client.post("/v1/messages/count_tokens", body=body, cast_to=object)
            assert_anthropic_error(info.value.body, "invalid_request_error")
            assert info.value.response.headers["X-Request-ID"]
    async with aiohttp.ClientSession() as s:
        for data in (b"", b"{not json", b"[1, 2]"):
            async with s.post(gw.url + "/v1/messages/count_tokens", data=data,
                              headers={"Content-Type": "application/json"}) as resp:
                assert resp.status == 400 and resp.headers["X-Request-ID"]
                assert_anthropic_error(await resp.json(), "invalid_request_error")
    assert upstream.requests == []


async def test_count_tokens_authenticates_and_honours_allowed_models(upstream, gateway_factory):
    gw = await start(upstream, gateway_factory, keys=[f"{ALICE} name=alice models=gpt-4o-mini", f"{BOB} name=bob"])
    async with client_for(gw, key=None) as client:
        with pytest.raises(anthropic.AuthenticationError) as info:
            await client.messages.count_tokens(model="gpt-4o-mini", messages=HI)
    assert_anthropic_error(info.value.body, "authentication_error")
    assert info.value.response.headers["X-Request-ID"]
    async with client_for(gw, key="sk-ant-wrong-000000000000") as client:
        with pytest.raises(anthropic.AuthenticationError):
            await client.messages.count_tokens(model="gpt-4o-mini", messages=HI)
    async with client_for(gw, key=ALICE) as client:
        assert (await client.messages.count_tokens(model="gpt-4o-mini", messages=HI)).input_tokens > 0
        with pytest.raises(anthropic.NotFoundError) as info:
            await client.messages.count_tokens(model="claude-3-haiku", messages=HI)
    message = assert_anthropic_error(info.value.body, "not_found_error")
    assert message == "The model `claude-3-haiku` does not exist or you do not have access to it."
    assert info.value.response.headers["X-Request-ID"]
    async with client_for(gw, key=BOB) as client:
        assert (await client.messages.count_tokens(model="claude-3-haiku", messages=HI)).input_tokens > 0
    assert upstream.requests == []


async def test_count_tokens_runs_exchange_done_once_per_request(upstream, gateway_factory):
    recorder = Recorder()
    gw = await start(upstream, gateway_factory, keys=[f"{ALICE} name=alice models=gpt-4o-mini"], recorder=recorder)
    async with client_for(gw, key=ALICE) as client:
        await client.messages.count_tokens(model="gpt-4o-mini", messages=HI)
        with pytest.raises(anthropic.BadRequestError):
            await client.post("/v1/messages/count_tokens", body={"model": "gpt-4o-mini"}, cast_to=object)
        with pytest.raises(anthropic.NotFoundError):
            await client.messages.count_tokens(model="claude-3-haiku", messages=HI)
    async with client_for(gw, key=None) as client:
        with pytest.raises(anthropic.AuthenticationError):
            await client.messages.count_tokens(model="gpt-4o-mini", messages=HI)
    done = recorder.done
    assert [(e.endpoint, e.ingress) for e in done] == [("messages.count_tokens", "anthropic")] * 4
    assert [e.status for e in done] == [200, 400, 404, 401]
    assert [e.outcome for e in done] == [Outcome.OK] + [Outcome.REJECTED] * 3
    assert len({e.request_id for e in done}) == 4
    assert all(e.ended is not None and e.usage is None and not e.routes for e in done)
    assert done[0].model == "gpt-4o-mini" and done[0].principal.name == "alice"
    # The built-in metrics and access-log plugins took the new endpoint: one route label, its own.
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/metrics") as resp:
            text = await resp.text()
    assert 'route="messages.count_tokens:anthropic"' in text
    assert upstream.requests == []


async def test_count_tokens_is_not_rate_limited_as_a_completion(upstream, gateway_factory):
    gw = await start(upstream, gateway_factory, keys=[f"{ALICE} name=alice rpm=1"], ratelimit=True)
    async with client_for(gw, key=ALICE) as client:
        for _ in range(5):  # beyond the key's one request a minute: a count is not a completion
            assert (await client.messages.count_tokens(model="m", messages=HI)).input_tokens > 0
        await client.messages.create(model="m", max_tokens=5, messages=HI)  # the minute's budget is intact
        with pytest.raises(anthropic.RateLimitError):
            await client.messages.create(model="m", max_tokens=5, messages=HI)
        assert (await client.messages.count_tokens(model="m", messages=HI)).input_tokens > 0  # still counts
    assert len(upstream.requests) == 1


async def test_wrong_method_on_messages_is_an_anthropic_405(upstream, gateway_factory):
    gw = await start(upstream, gateway_factory)
    async with aiohttp.ClientSession() as s:
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            for method in ("GET", "PUT", "DELETE"):
                async with s.request(method, gw.url + path) as resp:
                    assert resp.status == 405, (method, path)
                    assert resp.headers["Allow"] == "POST"
                    assert resp.headers["X-Request-ID"]
                    assert_anthropic_error(await resp.json(), "invalid_request_error")
        async with s.get(gw.url + "/v1/chat/completions") as resp:  # the OpenAI surface keeps OpenAI's format
            assert resp.status == 405 and (await resp.json())["error"]["code"] == "method_not_allowed"
    async with client_for(gw) as client:  # as the SDK sees it
        with pytest.raises(anthropic.APIStatusError) as info:
            await client.get("/v1/messages", cast_to=object)
    assert info.value.status_code == 405 and info.value.body["type"] == "error"


async def test_unknown_path_under_messages_is_an_anthropic_404(upstream, gateway_factory):
    gw = await start(upstream, gateway_factory)
    async with aiohttp.ClientSession() as s:
        for method, path in (("POST", "/v1/messages/nope"), ("GET", "/v1/messages/nope"),
                             ("POST", "/v1/messages/batches/msgbatch_01/results")):
            async with s.request(method, gw.url + path, json={"model": "m", "messages": HI}) as resp:
                assert resp.status == 404, (method, path)
                assert resp.headers["X-Request-ID"]
                assert "Allow" not in resp.headers
                assert_anthropic_error(await resp.json(), "not_found_error")
        for path in ("/v1/messagesx", "/v1/nothing"):  # not under /v1/messages: OpenAI's format, as before
            async with s.post(gw.url + path) as resp:
                assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    async with client_for(gw) as client:
        with pytest.raises(anthropic.NotFoundError) as info:
            await client.post("/v1/messages/nope", body={"model": "m", "messages": HI}, cast_to=object)
    assert_anthropic_error(info.value.body, "not_found_error")
    assert upstream.requests == []
