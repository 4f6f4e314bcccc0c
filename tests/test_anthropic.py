"""Anthropic both ways: the `anthropic` provider behind OpenAI clients, and `/v1/messages` for Anthropic clients,
with the official SDKs as clients and an upstream speaking the Anthropic wire format exactly."""
from __future__ import annotations

from typing import Any

import anthropic
import attrs
import openai
import orjson
import pytest

from proxy import hookimpl
from proxy.config.schema import Config, PipelineEntry, ProviderConfig
from proxy.testing import Script, config_for
from tests.anthropic_upstream import AnthropicUpstream
from tests.conftest import openai_client
from tests.helpers import ReasoningUpstream

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture
async def claude():
    up = await AnthropicUpstream.start()
    yield up
    await up.close()


def anthropic_config(claude, *others, **options):
    providers = [ProviderConfig(name="claude", type="anthropic", base_url=claude.base_url, api_key="sk-ant-test",
                                models=("claude-*",), max_tokens_default=1024, **options)]
    for i, up in enumerate(others):
        providers.append(ProviderConfig(name=f"up{i}", type="openai", base_url=up.base_url, priority=2 + i))
    return Config(providers=tuple(providers), pipeline=(PipelineEntry("router"),))


async def test_openai_request_is_translated_for_anthropic(claude, gateway_factory):
    gw = await gateway_factory(anthropic_config(claude))
    client = openai_client(gw.base_url)
    answer = await client.chat.completions.create(
        model="claude-3-haiku", temperature=1.5, top_p=0.9, stop="END", user="u-1", tools=TOOLS,
        tool_choice="required",
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "Hi"},
                                               {"type": "image_url",
                                                "image_url": {"url": "data:image/png;base64,iVBO"}}]},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "call_1", "type": "function",
                       "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
                  {"role": "user", "content": "Thanks"}])
    await client.close()
    sent = claude.requests[-1]
    headers = claude.headers[-1]
    assert headers["x-api-key"] == "sk-ant-test" and headers["anthropic-version"] == "2023-06-01"
    assert sent["system"] == "Be brief." and sent["max_tokens"] == 1024
    assert sent["temperature"] == 1.0 and sent["top_p"] == 0.9 and sent["stop_sequences"] == ["END"]
    assert sent["metadata"] == {"user_id": "u-1"}
    assert sent["tools"] == [{"name": "get_weather", "description": "Weather for a city",
                              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    assert sent["tool_choice"] == {"type": "any"}
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
    assert sent["messages"][0]["content"][1] == {"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "iVBO"}}
    assert sent["messages"][1]["content"] == [{"type": "tool_use", "id": "call_1", "name": "get_weather",
                                               "input": {"city": "Oslo"}}]
    assert sent["messages"][2]["content"][0] == {"type": "tool_result", "tool_use_id": "call_1",
                                                 "content": "Sunny"}
    assert answer.choices[0].message.content == "Hello from Claude"
    assert answer.choices[0].finish_reason == "stop"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (25, 15)


async def test_a_long_request_for_anthropic_is_translated_from_its_one_parse(claude, gateway_factory):
    """The adapter builds its request from the parsed body, so the gateway keeps a long request's parse for it
    (``reads_payload``) rather than letting it go once routed and parsing again."""

    class Seen:
        before = after = None

        @hookimpl
        def check_request(self, exchange):
            Seen.before = exchange.json

        @hookimpl
        def exchange_done(self, exchange):
            Seen.after = exchange.json

    config = anthropic_config(claude)
    config = attrs.evolve(config, pipeline=(PipelineEntry("seen"), *config.pipeline))
    gw = await gateway_factory(config, plugins={"seen": Seen()})
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "lorem ipsum " * 40}
             for i in range(41)]
    client = openai_client(gw.base_url)
    answer = await client.chat.completions.create(model="claude-3-haiku", messages=turns)
    await client.close()
    assert answer.choices[0].message.content == "Hello from Claude"
    assert [m["content"][0]["text"] for m in claude.requests[-1]["messages"]] == [t["content"] for t in turns]
    assert Seen.after is Seen.before


async def test_anthropic_stream_becomes_openai_chunks(claude, gateway_factory):
    claude.tool = {"name": "get_weather", "input_parts": ["{\"city\": ", "\"Oslo\"}"]}
    gw = await gateway_factory(anthropic_config(claude))
    client = openai_client(gw.base_url)
    stream = await client.chat.completions.create(model="claude-3-haiku", messages=[{"role": "user", "content": "Hi"}],
                                                  tools=TOOLS, stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    await client.close()
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from Claude"
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].id == "toolu_01A" and calls[0].function.name == "get_weather"
    assert "".join(tc.function.arguments or "" for tc in calls) == "{\"city\": \"Oslo\"}"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["tool_calls"]
    assert chunks[-1].usage.prompt_tokens == 25 and chunks[-1].usage.completion_tokens == 15
    assert {c.id for c in chunks} == {"msg_01XYZ"}


@pytest.mark.parametrize("in_delta", [False, True], ids=["message_start", "message_delta"])
async def test_anthropic_prompt_cache_counts_become_openai_cached_tokens(claude, gateway_factory, in_delta):
    """Anthropic's input_tokens leaves out the prompt-cache reads and writes; OpenAI's prompt_tokens is the whole
    prompt, with the cache reads in prompt_tokens_details.cached_tokens. Streams may give the counts at
    message_start or (cumulatively) in message_delta."""
    claude.cache_usage = {"cache_read_input_tokens": 1000, "cache_creation_input_tokens": 200}
    claude.cache_in_delta = in_delta
    gw = await gateway_factory(anthropic_config(claude))
    client = openai_client(gw.base_url)
    messages = [{"role": "user", "content": "Hi"}]
    answer = await client.chat.completions.create(model="claude-3-haiku", messages=messages)
    stream = await client.chat.completions.create(model="claude-3-haiku", messages=messages, stream=True,
                                                  stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    await client.close()
    for usage in (answer.usage, chunks[-1].usage):
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (1225, 15, 1240)
        assert usage.prompt_tokens_details.cached_tokens == 1000


async def test_messages_ingress_reports_openai_cached_tokens_as_cache_reads(upstream, gateway_factory):
    """The other way: an OpenAI upstream's cached_tokens become the anthropic SDK's cache_read_input_tokens, and
    input_tokens the rest of the prompt, in non-stream answers and at the end of streams."""
    upstream.script = Script(usage={"prompt_tokens": 1200, "completion_tokens": 4, "total_tokens": 1204,
                                    "prompt_tokens_details": {"cached_tokens": 1024}})
    gw = await gateway_factory(config_for(upstream))
    client = anthropic_client(gw)
    messages = [{"role": "user", "content": "Hi"}]
    message = await client.messages.create(model="m", max_tokens=50, messages=messages)
    async with client.messages.stream(model="m", max_tokens=50, messages=messages) as stream:
        final = await stream.get_final_message()
    await client.close()
    for usage in (message.usage, final.usage):
        assert (usage.input_tokens, usage.cache_read_input_tokens, usage.output_tokens) == (176, 1024, 4)


async def test_anthropic_errors_become_openai_errors_and_529_falls_back(claude, upstream, gateway_factory):
    claude.error = (400, "invalid_request_error", "messages: roles must alternate")
    gw = await gateway_factory(anthropic_config(claude))
    client = openai_client(gw.base_url)
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="claude-3-haiku", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["message"] == "messages: roles must alternate"
    assert info.value.body["type"] == "invalid_request_error"
    await client.close()

    claude.error = (529, "overloaded_error", "Overloaded")
    gw2 = await gateway_factory(with_backup(anthropic_config(claude), upstream))
    client = openai_client(gw2.base_url)
    answer = await client.chat.completions.create(model="claude-3-haiku", messages=[{"role": "user", "content": "x"}])
    assert answer.choices[0].message.content == "Hello, world!"
    await client.close()


def with_backup(config, upstream):
    backup = ProviderConfig(name="backup", type="openai", base_url=upstream.base_url, models=("*",), priority=2)
    return config.__class__(providers=(config.providers[0], backup), pipeline=config.pipeline)


async def test_error_event_before_any_text_falls_back(claude, upstream, gateway_factory):
    """Overloaded right after message_start: the role chunk was held back, so the backup can still answer."""
    claude.error_event_at = 0
    gw = await gateway_factory(with_backup(anthropic_config(claude), upstream))
    client = openai_client(gw.base_url)
    stream = await client.chat.completions.create(model="claude-3-haiku", stream=True,
                                                  messages=[{"role": "user", "content": "x"}])
    chunks = [c async for c in stream]
    await client.close()
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello, world!"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.role) == 1


async def test_error_event_after_text_is_an_in_band_error(claude, upstream, gateway_factory):
    claude.error_event_at = 1
    claude.texts = ["x", "y"]
    gw = await gateway_factory(with_backup(anthropic_config(claude), upstream))
    client = openai_client(gw.base_url)
    stream = await client.chat.completions.create(model="claude-3-haiku", stream=True,
                                                  messages=[{"role": "user", "content": "x"}])
    received = []
    with pytest.raises(openai.APIError, match="Overloaded"):
        async for c in stream:
            received.append(c.choices[0].delta.content or "" if c.choices else "")
    await client.close()
    assert "".join(received) == "x"  # what was sent stays; the stream does not silently stop
    assert upstream.requests == []


def anthropic_client(gw) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=gw.url, api_key="unused", max_retries=0)


async def final_message(client: anthropic.AsyncAnthropic, stream: bool, **ask) -> Any:
    """The answer to ``ask``: streamed and accumulated by the SDK, or whole."""
    if not stream:
        return await client.messages.create(**ask)
    async with client.messages.stream(**ask) as events:
        return await events.get_final_message()


@pytest.mark.parametrize("behind", ["anthropic", "openai"])
async def test_messages_ingress_with_the_anthropic_sdk(claude, upstream, gateway_factory, behind):
    if behind == "anthropic":
        gw = await gateway_factory(anthropic_config(claude))
        expected = "Hello from Claude"
    else:
        gw = await gateway_factory(config_for(upstream))
        expected = "Hello, world!"
    client = anthropic_client(gw)
    message = await client.messages.create(model="claude-3-haiku", max_tokens=50, system="Be brief.",
                                           messages=[{"role": "user", "content": "Hi"}])
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].text == expected and message.stop_reason == "end_turn"
    assert message.usage.output_tokens > 0
    async with client.messages.stream(model="claude-3-haiku", max_tokens=50,
                                      messages=[{"role": "user", "content": "Hi"}]) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == expected
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0
    await client.close()
    if behind == "openai":
        sent = upstream.requests[0]
        assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        assert sent["max_tokens"] == 50


async def test_messages_ingress_stream_reports_the_prompt_tokens(upstream, gateway_factory):
    """OpenAI usage arrives at the end of the stream, after message_start: the final message_delta carries
    input_tokens, so the SDK's final message counts the prompt as a non-stream answer does."""
    upstream.script = Script(usage={"prompt_tokens": 23, "completion_tokens": 4, "total_tokens": 27})
    gw = await gateway_factory(config_for(upstream))
    client = anthropic_client(gw)
    message = await client.messages.create(model="m", max_tokens=50, messages=[{"role": "user", "content": "Hi"}])
    async with client.messages.stream(model="m", max_tokens=50,
                                      messages=[{"role": "user", "content": "Hi"}]) as stream:
        final = await stream.get_final_message()
    await client.close()
    assert message.usage.input_tokens == 23
    assert final.usage.input_tokens == message.usage.input_tokens
    assert final.usage.output_tokens == message.usage.output_tokens == 4
    assert final.stop_reason == "end_turn" and final.content[0].text == "Hello, world!"


async def test_messages_ingress_stream_stopped_by_a_plugin_counts_what_was_sent(upstream, gateway_factory):
    """A stream an on_chunk hook stops never gets the upstream's usage: the final message still counts the prompt and
    the output sent (estimated, as the rate limiter charges it), and ends with ``refusal``."""
    from proxy import StopStream, hookimpl

    class Stopper:
        @hookimpl
        def on_chunk(self, chunk):
            if chunk.json and "forbidden" in str(chunk.json):
                raise StopStream("banned word")

    upstream.script = Script(texts=["fine ", "forbidden", " more"])
    gw = await gateway_factory(config_for(upstream, pipeline=["stop", "router"]), plugins={"stop": Stopper()})
    client = anthropic_client(gw)
    async with client.messages.stream(model="m", max_tokens=50,
                                      messages=[{"role": "user", "content": "Hi there"}]) as stream:
        final = await stream.get_final_message()
    await client.close()
    assert final.stop_reason == "refusal" and final.content[0].text == "fine "
    assert final.usage.input_tokens > 0 and final.usage.output_tokens >= 2


async def test_messages_ingress_errors_use_the_anthropic_format(upstream, gateway_factory):
    gw = await gateway_factory(config_for(upstream))
    client = anthropic_client(gw)
    with pytest.raises(anthropic.BadRequestError) as info:
        await client.messages.create(model="m", max_tokens=0, messages=[{"role": "user", "content": "x"}])
    assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "invalid_request_error"
    upstream.script = Script(status=500, error="upstream broke")
    with pytest.raises(anthropic.InternalServerError) as info:
        await client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert info.value.body["error"]["message"] == "upstream broke"
    await client.close()


async def test_messages_ingress_midstream_error_is_an_anthropic_error_event(upstream, gateway_factory):
    upstream.script = Script(texts=["a", "b", "c"], cut_after=2)
    gw = await gateway_factory(config_for(upstream))
    import aiohttp

    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/messages", data=orjson.dumps({
                "model": "m", "max_tokens": 5, "stream": True,
                "messages": [{"role": "user", "content": "x"}]})) as resp:
            text = await resp.text()
    events = [line[7:] for line in text.splitlines() if line.startswith("event: ")]
    assert events[0] == "message_start" and events[-1] == "error"
    assert "message_stop" not in events
    error = orjson.loads(text.strip().splitlines()[-1][len("data: "):])
    assert error["type"] == "error" and error["error"]["type"] == "api_error"  # a type the anthropic SDK knows


async def test_messages_ingress_text_blocks_stay_apart_and_ids_are_anthropic(upstream, gateway_factory):
    """Several text blocks (a system prompt in parts, a user turn in parts) become one string a line apart, not
    run together; answers carry ``msg_`` ids, as Anthropic's do."""
    gw = await gateway_factory(config_for(upstream))
    client = anthropic_client(gw)
    kwargs = dict(model="m", max_tokens=50, system=[{"type": "text", "text": "SYS1"}, {"type": "text", "text": "SYS2"}],
                  messages=[{"role": "user", "content": [{"type": "text", "text": "part one"},
                                                         {"type": "text", "text": "part two"}]}])
    message = await client.messages.create(**kwargs)
    async with client.messages.stream(**kwargs) as stream:
        final = await stream.get_final_message()
    await client.close()
    assert message.id.startswith("msg_") and final.id.startswith("msg_")
    for sent in upstream.requests:
        assert sent["messages"] == [{"role": "system", "content": "SYS1\nSYS2"},
                                    {"role": "user", "content": "part one\npart two"}]


@pytest.mark.parametrize("messages", [["hi"], [{"role": "user", "content": ["not a block"]}], [],
                                      [{"role": "system", "content": "be brief"}, {"role": "user", "content": "x"}]],
                         ids=["message-not-an-object", "block-not-an-object", "no-messages", "system-role"])
async def test_messages_ingress_malformed_messages_are_a_400_not_a_crash(upstream, gateway_factory, messages):
    import aiohttp

    gw = await gateway_factory(config_for(upstream))
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/messages", data=orjson.dumps({
                "model": "m", "max_tokens": 5, "messages": messages})) as resp:
            assert resp.status == 400
            body = await resp.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert upstream.requests == []


async def test_anthropic_overloaded_is_529_for_anthropic_clients_and_503_for_openai_clients(claude, gateway_factory):
    """Anthropic's 529 ``overloaded_error`` reaches /v1/messages clients as it left Anthropic (the anthropic SDK's
    OverloadedError, streamed or not); OpenAI clients, which know no 529, get a 503 with the upstream's type."""
    claude.error = (529, "overloaded_error", "Overloaded")
    gw = await gateway_factory(anthropic_config(claude))
    client = anthropic_client(gw)
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(anthropic.OverloadedError) as info:
        await client.messages.create(model="claude-3-haiku", max_tokens=50, messages=messages)
    assert info.value.status_code == 529
    assert info.value.body == {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    with pytest.raises(anthropic.OverloadedError) as info:
        async with client.messages.stream(model="claude-3-haiku", max_tokens=50, messages=messages) as stream:
            await stream.get_final_message()
    assert info.value.status_code == 529 and info.value.body["error"]["type"] == "overloaded_error"
    await client.close()
    oclient = openai_client(gw.base_url)
    with pytest.raises(openai.InternalServerError) as oinfo:
        await oclient.chat.completions.create(model="claude-3-haiku", messages=messages)
    await oclient.close()
    assert oinfo.value.status_code == 503
    assert oinfo.value.body["type"] == "overloaded_error" and oinfo.value.body["message"] == "Overloaded"


async def test_stop_sequence_survives_the_anthropic_round_trip(claude, gateway_factory):
    """An Anthropic answer that stopped on a stop sequence: /v1/messages clients get ``stop_reason:
    stop_sequence`` and the sequence (non-stream and stream); OpenAI clients get ``finish_reason: stop``, and the
    sequence as ``stop_reason``, the extra field vLLM uses for it."""
    claude.stop_reason, claude.stop_sequence = "stop_sequence", "END"
    gw = await gateway_factory(anthropic_config(claude))
    client = anthropic_client(gw)
    kwargs: dict = dict(model="claude-3-haiku", max_tokens=50, stop_sequences=["END"],
                        messages=[{"role": "user", "content": "Count"}])
    message = await client.messages.create(**kwargs)
    async with client.messages.stream(**kwargs) as stream:
        final = await stream.get_final_message()
    await client.close()
    assert claude.requests[0]["stop_sequences"] == ["END"]
    for answer in (message, final):
        assert (answer.stop_reason, answer.stop_sequence) == ("stop_sequence", "END")
        assert answer.content[0].text == "Hello from Claude"

    oclient = openai_client(gw.base_url)
    messages = [{"role": "user", "content": "Count"}]
    answer = await oclient.chat.completions.create(model="claude-3-haiku", stop="END", messages=messages)
    stream = await oclient.chat.completions.create(model="claude-3-haiku", stop="END", messages=messages,
                                                   stream=True)
    chunks = [c async for c in stream]
    await oclient.close()
    assert answer.choices[0].finish_reason == "stop" and answer.choices[0].to_dict()["stop_reason"] == "END"
    finishes = [c.choices[0].to_dict() for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [(f["finish_reason"], f.get("stop_reason")) for f in finishes] == [("stop", "END")]


@pytest.mark.parametrize("first", ["stream", "whole"])
async def test_a_cached_answer_keeps_its_stop_sequence_in_the_other_mode(claude, gateway_factory, first):
    """The cache stores a stream's chunks or a whole answer, and replays either as the other (merged, or split):
    the matched stop sequence rides along both ways."""
    claude.stop_reason, claude.stop_sequence = "stop_sequence", "END"
    config = anthropic_config(claude)
    cache = PipelineEntry("cache", {"only_deterministic": False})
    gw = await gateway_factory(attrs.evolve(config, pipeline=(cache, PipelineEntry("router"))))
    client = anthropic_client(gw)
    kwargs: dict = dict(model="claude-3-haiku", max_tokens=50, stop_sequences=["END"],
                        messages=[{"role": "user", "content": "Count"}])

    async def streamed():  # type: ignore[no-untyped-def]
        async with client.messages.stream(**kwargs) as stream:
            return await stream.get_final_message()

    answers = [await streamed(), await client.messages.create(**kwargs)] if first == "stream" else \
        [await client.messages.create(**kwargs), await streamed()]
    await client.close()
    assert len(claude.requests) == 1  # the second was the cache's
    for answer in answers:
        assert (answer.stop_reason, answer.stop_sequence) == ("stop_sequence", "END")


async def test_anthropic_answers_without_a_stop_sequence_carry_none(claude, gateway_factory):
    """The usual end: ``end_turn`` and ``stop_sequence: null`` for Anthropic clients, and no extra field at all in
    what OpenAI clients get."""
    gw = await gateway_factory(anthropic_config(claude))
    client = anthropic_client(gw)
    message = await client.messages.create(model="claude-3-haiku", max_tokens=50,
                                           messages=[{"role": "user", "content": "Hi"}])
    await client.close()
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
    import aiohttp

    async with aiohttp.ClientSession() as s:
        async with s.post(gw.base_url + "/chat/completions", data=orjson.dumps({
                "model": "claude-3-haiku", "messages": [{"role": "user", "content": "Hi"}]})) as resp:
            body = await resp.json()
    assert "stop_reason" not in body["choices"][0]


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
async def test_n_above_1_is_refused_for_anthropic_before_any_upstream_call(claude, gateway_factory, stream):
    """A Messages request has one answer: n=2 is a 400 naming the provider, not one choice passed off as all."""
    gw = await gateway_factory(anthropic_config(claude))
    client = openai_client(gw.base_url)
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="claude-3-haiku", n=2, stream=stream,
                                             messages=[{"role": "user", "content": "x"}])
    await client.close()
    assert info.value.body["param"] == "n" and info.value.body["type"] == "invalid_request_error"
    assert info.value.body["code"] == "unsupported_value" and "'claude'" in info.value.body["message"]
    assert claude.requests == []


async def test_n_above_1_falls_back_to_a_route_that_serves_it(claude, upstream, gateway_factory):
    gw = await gateway_factory(with_backup(anthropic_config(claude), upstream))
    client = openai_client(gw.base_url)
    answer = await client.chat.completions.create(model="claude-3-haiku", n=2,
                                                  messages=[{"role": "user", "content": "x"}])
    await client.close()
    assert answer.choices[0].message.content == "Hello, world!"
    assert claude.requests == [] and upstream.requests[0]["n"] == 2


async def test_response_format_text_is_served_and_json_modes_are_refused(claude, gateway_factory):
    """``{"type": "text"}`` is the default and goes through; the Messages API has no JSON mode, so ``json_object``
    and ``json_schema`` are a 400 (``param: response_format``) rather than an answer that ignored them."""
    gw = await gateway_factory(anthropic_config(claude))
    client = openai_client(gw.base_url)
    messages = [{"role": "user", "content": "x"}]
    answer = await client.chat.completions.create(model="claude-3-haiku", messages=messages,
                                                  response_format={"type": "text"})
    assert answer.choices[0].message.content == "Hello from Claude"
    assert len(claude.requests) == 1 and "response_format" not in claude.requests[0]
    schema = {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}, "strict": True}}
    for response_format in ({"type": "json_object"}, schema):
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="claude-3-haiku", messages=messages,
                                                 response_format=response_format)
        assert info.value.body["param"] == "response_format" and "'claude'" in info.value.body["message"]
        assert response_format["type"] in info.value.body["message"]
    await client.close()
    assert len(claude.requests) == 1


async def test_reasoning_effort_turns_on_thinking_and_the_stream_carries_it_back(claude, gateway_factory):
    """OpenAI client, Anthropic upstream: ``reasoning_effort`` becomes ``thinking`` with a budget (max_tokens
    raised past it, temperature left out as Anthropic requires); the thinking streams as ``reasoning_content``
    and ends with its signed block in ``thinking_blocks``, which the next turn (after a tool call) sends back."""
    claude.thinking = ["Let me ", "think."]
    claude.tool = {"name": "get_weather", "input_parts": ["{\"city\": \"Oslo\"}"]}
    gw = await gateway_factory(anthropic_config(claude))
    client = openai_client(gw.base_url)
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    stream = await client.chat.completions.create(model="claude-sonnet-4", messages=messages, tools=TOOLS,
                                                  reasoning_effort="medium", temperature=0.2, max_tokens=500,
                                                  stream=True)
    chunks = [c async for c in stream]
    sent = claude.requests[-1]
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert sent["max_tokens"] == 2548 and "temperature" not in sent
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "Let me think."
    blocks = [b for d in deltas for b in (getattr(d, "thinking_blocks", None) or [])]
    assert blocks == [{"type": "thinking", "thinking": "Let me think.", "signature": claude.signature}]
    assert "".join(d.content or "" for d in deltas) == "Hello from Claude"
    call = next(tc for d in deltas for tc in (d.tool_calls or []) if tc.id)
    # the next turn: the assistant's message with its thinking blocks, then the tool's result
    claude.thinking, claude.tool = None, None
    messages += [{"role": "assistant", "content": None, "thinking_blocks": blocks,
                  "tool_calls": [{"id": call.id, "type": "function",
                                  "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
                 {"role": "tool", "tool_call_id": call.id, "content": "4 degrees"}]
    await client.chat.completions.create(model="claude-sonnet-4", messages=messages, tools=TOOLS,
                                         reasoning_effort="medium")
    await client.close()
    assistant = claude.requests[-1]["messages"][1]
    assert assistant["role"] == "assistant" and assistant["content"][0] == blocks[0]
    assert assistant["content"][1]["type"] == "tool_use"


async def test_a_whole_answer_with_thinking_has_reasoning_content_and_thinking_blocks(claude, gateway_factory):
    claude.thinking = ["Short ", "thought."]
    gw = await gateway_factory(anthropic_config(claude))
    client = openai_client(gw.base_url)
    answer = await client.chat.completions.create(
        model="claude-sonnet-4", messages=[{"role": "user", "content": "Hi"}],
        extra_body={"thinking": {"type": "enabled", "budget_tokens": 3000}})
    await client.close()
    assert claude.requests[-1]["thinking"] == {"type": "enabled", "budget_tokens": 3000}
    assert claude.requests[-1]["max_tokens"] == 1024 + 3000  # the provider's default, raised past the budget
    message = answer.choices[0].message
    assert message.content == "Hello from Claude"
    assert message.reasoning_content == "Short thought."  # type: ignore[attr-defined]
    assert message.thinking_blocks == [  # type: ignore[attr-defined]
        {"type": "thinking", "thinking": "Short thought.", "signature": claude.signature}]


async def test_without_reasoning_no_thinking_is_asked_and_sampling_is_kept(claude, gateway_factory):
    gw = await gateway_factory(anthropic_config(claude))
    client = openai_client(gw.base_url)
    await client.chat.completions.create(model="claude-3-haiku", messages=[{"role": "user", "content": "Hi"}],
                                         temperature=0.3, extra_body={"top_k": 7})
    await client.close()
    sent = claude.requests[-1]
    assert "thinking" not in sent and sent["temperature"] == 0.3 and sent["top_k"] == 7


THINK = {"type": "enabled", "budget_tokens": 1024}
#: A signed thinking block of an earlier assistant turn, and a history that carries it before a tool call.
SIGNED = {"type": "thinking", "thinking": "I need the weather.", "signature": "sig-0"}
TOOL_TURNS = [{"role": "user", "content": "Weather in Oslo?"},
              {"role": "assistant", "content": [SIGNED, {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                         "input": {"city": "Oslo"}}]},
              {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                            "content": "4 degrees"}]}]
CLAUDE_TOOLS = [{"name": "get_weather", "description": "Weather for a city",
                 "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]


async def test_messages_ingress_thinking_reaches_an_anthropic_provider_and_streams_back_signed(
        claude, gateway_factory):
    claude.thinking = ["Let me ", "think."]
    gw = await gateway_factory(anthropic_config(claude))
    client = anthropic_client(gw)
    async with client.messages.stream(model="claude-sonnet-4", max_tokens=2000, thinking=THINK,
                                      extra_body={"temperature": 1},
                                      messages=[{"role": "user", "content": "Hi"}]) as stream:
        final = await stream.get_final_message()
    await client.close()
    sent = claude.requests[-1]
    assert sent["thinking"] == THINK and sent["max_tokens"] == 2000 and sent["temperature"] == 1  # as sent
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "Let me think." and final.content[0].signature == claude.signature
    assert final.content[1].text == "Hello from Claude"


async def test_messages_ingress_sends_the_historys_thinking_blocks_back_to_anthropic(claude, gateway_factory):
    """After a tool call, Anthropic requires the assistant turn's thinking block (signed) back."""
    claude.thinking = ["Now ", "answer."]
    gw = await gateway_factory(anthropic_config(claude))
    client = anthropic_client(gw)
    answer = await client.messages.create(model="claude-sonnet-4", max_tokens=2000, thinking=THINK,
                                          tools=CLAUDE_TOOLS, messages=TOOL_TURNS)
    await client.close()
    assistant = claude.requests[-1]["messages"][1]
    assert assistant["content"][0] == SIGNED and assistant["content"][1]["type"] == "tool_use"
    assert answer.content[0].type == "thinking" and answer.content[0].signature == claude.signature


async def test_top_k_and_thinking_reach_anthropic_only(claude, upstream, gateway_factory):
    """An OpenAI-compatible upstream never sees them (OpenAI refuses unknown parameters)."""
    gw = await gateway_factory(anthropic_config(claude))
    client = anthropic_client(gw)
    await client.messages.create(model="claude-3-haiku", max_tokens=50, extra_body={"top_k": 5},
                                 messages=[{"role": "user", "content": "Hi"}])
    await client.close()
    assert claude.requests[-1]["top_k"] == 5
    gw2 = await gateway_factory(config_for(upstream))
    client2 = anthropic_client(gw2)
    await client2.messages.create(model="m", max_tokens=2000, extra_body={"top_k": 5}, thinking=THINK,
                                  messages=[{"role": "user", "content": "Hi"}])
    await client2.close()
    assert not {"top_k", "thinking"} & set(upstream.requests[-1])


@pytest.mark.parametrize("stream", [False, True])
async def test_messages_ingress_shows_a_reasoning_servers_reasoning_as_thinking(gateway_factory, stream):
    up = await ReasoningUpstream(["Because ", "so."], ["42."]).start()
    try:
        gw = await gateway_factory(config_for(up.base_url))
        client = anthropic_client(gw)
        answer = await final_message(client, stream, model="deepseek-r1", max_tokens=100,
                                     messages=[{"role": "user", "content": "Why?"}])
        await client.close()
        assert [b.type for b in answer.content] == ["thinking", "text"]
        assert answer.content[0].thinking == "Because so." and answer.content[1].text == "42."
    finally:
        await up.close()


async def test_the_cache_keys_what_rides_beside_a_messages_request(claude, gateway_factory):
    cache = PipelineEntry("cache", {"only_deterministic": False})
    gw = await gateway_factory(attrs.evolve(anthropic_config(claude), pipeline=(cache, PipelineEntry("router"))))
    client = anthropic_client(gw)
    ask: dict = dict(model="claude-3-haiku", max_tokens=50, messages=[{"role": "user", "content": "Hi"}])
    for top_k in (5, 6, 5):
        await client.messages.create(**ask, extra_body={"top_k": top_k})
    await client.close()
    assert [r["top_k"] for r in claude.requests] == [5, 6]  # the third was the first's, from the cache


async def test_messages_ingress_sends_the_clients_own_request_to_anthropic(claude, gateway_factory):
    """Nothing changed the translation: the Anthropic client's request goes as it is, with what the OpenAI
    format cannot carry (``cache_control`` on the system prompt, a message and a tool; ``metadata``), and the
    route's model."""
    config = anthropic_config(claude)
    router = PipelineEntry("router", {"aliases": {"sonnet": ["claude-sonnet-4"]}})
    gw = await gateway_factory(attrs.evolve(config, pipeline=(router,)))
    client = anthropic_client(gw)
    cached = {"type": "ephemeral"}
    request: dict = dict(
        max_tokens=300, metadata={"user_id": "u-7"},
        system=[{"type": "text", "text": "You are terse.", "cache_control": cached}],
        tools=[{**CLAUDE_TOOLS[0], "cache_control": cached}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "Long document...", "cache_control": cached},
                                               {"type": "text", "text": "Summarize."}]}])
    await client.messages.create(model="sonnet", **request)
    await client.close()
    assert claude.requests[-1] == {"model": "claude-sonnet-4", **request}


class EditsTheRequest:
    """A plugin that rewrites the upstream request (the last user message's text)."""

    @hookimpl
    def upstream_request(self, exchange, request):  # type: ignore[no-untyped-def]
        request.json["messages"] = [*request.json["messages"][:-1], {"role": "user", "content": "edited"}]


async def test_an_edited_messages_request_is_translated_and_keeps_thinking_top_k_and_signed_history(
        claude, gateway_factory):
    """A plugin changed the request: the translation of the change goes, and what the OpenAI format has no field
    for rides beside it (thinking, top_k, the history's signed thinking blocks)."""
    config = attrs.evolve(anthropic_config(claude), pipeline=(PipelineEntry("edit"), PipelineEntry("router")))
    gw = await gateway_factory(config, plugins={"edit": EditsTheRequest()})
    client = anthropic_client(gw)
    await client.messages.create(model="claude-sonnet-4", max_tokens=2000, thinking=THINK, tools=CLAUDE_TOOLS,
                                 messages=TOOL_TURNS, extra_body={"top_k": 3})
    await client.messages.create(model="claude-3-haiku", max_tokens=50, extra_body={"top_k": 3},
                                 messages=[{"role": "user", "content": "Hi"}])
    await client.close()
    with_thinking, without = claude.requests[-2:]
    assert with_thinking["messages"][-1]["content"] == [{"type": "text", "text": "edited"}]  # the edit went
    assert with_thinking["thinking"] == THINK and "top_k" not in with_thinking  # (Anthropic refuses it with thinking)
    assert with_thinking["messages"][1]["content"][0] == SIGNED
    assert without["top_k"] == 3 and without["messages"][-1]["content"] == [{"type": "text", "text": "edited"}]


async def test_openai_clients_prompt_caching_marks_reach_anthropic(claude, gateway_factory):
    """``cache_control`` on a content part (system or user) or a tool, as LiteLLM's clients mark them."""
    gw = await gateway_factory(anthropic_config(claude))
    client = openai_client(gw.base_url)
    cached = {"type": "ephemeral"}
    await client.chat.completions.create(
        model="claude-3-haiku", tools=[{**TOOLS[0], "cache_control": cached}],  # type: ignore[list-item]
        messages=[{"role": "system", "content": [{"type": "text", "text": "You are terse.", "cache_control": cached}]},
                  {"role": "user", "content": [{"type": "text", "text": "Long document...", "cache_control": cached},
                                               {"type": "text", "text": "Summarize."}]}])  # type: ignore[list-item]
    await client.chat.completions.create(model="claude-3-haiku", messages=[
        {"role": "system", "content": "Plain."}, {"role": "user", "content": "Hi"}])
    await client.close()
    marked, plain = claude.requests[-2:]
    assert marked["system"] == [{"type": "text", "text": "You are terse.", "cache_control": cached}]
    assert marked["messages"][0]["content"] == [{"type": "text", "text": "Long document...", "cache_control": cached},
                                                {"type": "text", "text": "Summarize."}]
    assert marked["tools"][0]["cache_control"] == cached
    assert plain["system"] == "Plain."  # one string, as before, without marks


WEATHER = [{"role": "user", "content": "Weather?"}]


async def openai_stream(client: openai.AsyncOpenAI) -> tuple[list[Any], list[Any]]:
    """A streamed answer of claude-sonnet-4 to WEATHER: its chunks, and the deltas of their first choice."""
    stream = await client.chat.completions.create(model="claude-sonnet-4", messages=WEATHER, stream=True)
    chunks = [c async for c in stream]
    return chunks, [c.choices[0].delta for c in chunks if c.choices]


#: A server tool's call and result, as Claude answers with its web search tool.
WEB_SEARCH = [
    {"type": "server_tool_use", "id": "srvtoolu_01", "name": "web_search", "input": {"query": "weather in Paris"}},
    {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_01", "content": [
        {"type": "web_search_result", "url": "https://example.com/paris", "title": "Paris weather",
         "encrypted_content": "EqgfCioIARgBIiQ3YTAw", "page_age": "April 30, 2025"}]},
]


@pytest.mark.parametrize("stream", [False, True])
async def test_messages_ingress_keeps_a_server_tools_call_and_result(claude, gateway_factory, stream):
    claude.server_blocks = WEB_SEARCH
    gw = await gateway_factory(anthropic_config(claude))
    client = anthropic_client(gw)
    ask = {"model": "claude-sonnet-4", "max_tokens": 1000, "messages": [{"role": "user", "content": "Weather?"}],
           "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 1}]}
    final = await final_message(client, stream, **ask)
    await client.close()
    assert claude.requests[-1]["tools"] == ask["tools"]  # the client's own request went
    assert [b.type for b in final.content] == ["server_tool_use", "web_search_tool_result", "text"]
    call, result, text = final.content
    assert (call.id, call.name, call.input) == ("srvtoolu_01", "web_search", {"query": "weather in Paris"})
    assert result.tool_use_id == "srvtoolu_01" and result.content[0].url == "https://example.com/paris"
    assert result.content[0].encrypted_content == "EqgfCioIARgBIiQ3YTAw"
    assert text.text == "Hello from Claude" and final.stop_reason == "end_turn"


@pytest.mark.parametrize("stream", [False, True])
async def test_a_server_tools_call_is_no_tool_call_for_openai_clients(claude, gateway_factory, stream):
    """Its streamed input once went out as the arguments of a tool call with no id or name."""
    claude.server_blocks = WEB_SEARCH
    gw = await gateway_factory(anthropic_config(claude))
    client = openai_client(gw.base_url)
    messages = WEATHER
    if stream:
        chunks, deltas = await openai_stream(client)
        assert not any(d.tool_calls for d in deltas)
        assert "".join(d.content or "" for d in deltas) == "Hello from Claude"
        carried = [b for d in deltas for b in (d.model_extra or {}).get("anthropic_blocks") or ()]
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish == ["stop"]
    else:
        answer = await client.chat.completions.create(model="claude-sonnet-4", messages=messages)
        message = answer.choices[0].message
        assert message.tool_calls is None and message.content == "Hello from Claude"
        assert answer.choices[0].finish_reason == "stop"
        carried = (message.model_extra or {}).get("anthropic_blocks")
    await client.close()
    assert carried == WEB_SEARCH  # beside the answer, whole, for a client that wants them


#: A cited sentence of an answer that used web search, and its citation.
CITED = (" Paris is sunny today.", [{"type": "web_search_result_location", "url": "https://example.com/paris",
                                  "title": "Paris weather", "encrypted_index": "Eo8BCioIAhgBIiQyYjQ",
                                  "cited_text": "Sunny, 24 degrees, in Paris today."}])


@pytest.mark.parametrize("stream", [False, True])
async def test_citations_reach_openai_clients_as_url_annotations(claude, gateway_factory, stream):
    claude.cited = [CITED]
    gw = await gateway_factory(anthropic_config(claude))
    client = openai_client(gw.base_url)
    messages = WEATHER
    if stream:
        _, deltas = await openai_stream(client)
        content = "".join(d.content or "" for d in deltas)
        annotations = [a for d in deltas for a in (d.model_extra or {}).get("annotations") or ()]
    else:
        message = (await client.chat.completions.create(model="claude-sonnet-4", messages=messages)).choices[0].message
        content, annotations = message.content, [a.model_dump() for a in message.annotations or ()]
    await client.close()
    assert content == "Hello from Claude Paris is sunny today."
    [annotation] = annotations
    cite = annotation["url_citation"]
    assert annotation["type"] == "url_citation" and (cite["url"], cite["title"]) == ("https://example.com/paris",
                                                                                    "Paris weather")
    assert content[cite["start_index"]:cite["end_index"]] == CITED[0]


@pytest.mark.parametrize("stream", [False, True])
async def test_messages_ingress_keeps_the_citations(claude, gateway_factory, stream):
    claude.cited = [CITED]
    gw = await gateway_factory(anthropic_config(claude))
    client = anthropic_client(gw)
    final = await final_message(client, stream, model="claude-sonnet-4", max_tokens=1000,
                                messages=[{"role": "user", "content": "Weather?"}])
    await client.close()
    texts = [b for b in final.content if b.type == "text"]
    assert "".join(b.text for b in texts) == "Hello from Claude Paris is sunny today."
    cited = [b for b in texts if b.citations]
    # A whole answer keeps the cited sentence a block of its own; a stream's text is one block with its sources.
    assert [b.text for b in cited] == ([CITED[0]] if not stream else ["Hello from Claude Paris is sunny today."])
    [citation] = cited[0].citations
    assert citation.model_dump(exclude_none=True) == CITED[1][0]


async def test_citations_are_left_out_when_a_plugin_changed_the_cited_text(claude, gateway_factory):
    class Redact:
        @hookimpl
        def on_response(self, exchange, body):
            message = body["choices"][0]["message"]
            message["content"] = message["content"].replace("sunny", "[redacted]")

    claude.cited = [CITED]
    config = attrs.evolve(anthropic_config(claude), pipeline=(PipelineEntry("router"), PipelineEntry("redact")))
    gw = await gateway_factory(config, plugins={"redact": Redact()})
    client = anthropic_client(gw)
    final = await final_message(client, False, model="claude-sonnet-4", max_tokens=1000,
                                messages=[{"role": "user", "content": "Weather?"}])
    await client.close()
    assert [(b.type, b.text, b.citations) for b in final.content] == [
        ("text", "Hello from Claude Paris is [redacted] today.", None)]
