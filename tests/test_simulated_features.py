"""The embedded default's simulator answers tool calls, several choices and log probabilities, as a front end
testing those features against it expects: through the gateway, with the openai SDK, streamed and not, the two
agreeing."""
from __future__ import annotations

import json

import openai
import pytest

from proxy.config.load import load_config
from proxy.simulated_features import sample_of
from tests.conftest import openai_client

WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer"}, "detail": {"type": "object", "properties": {"hourly": {"type": "boolean"}}}},
        "required": ["city", "unit", "days", "detail"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
ASK = [{"role": "user", "content": "Weather in Oslo?"}]


@pytest.fixture
async def client(gateway_factory):
    gw = await gateway_factory(load_config(env={}))  # the embedded default: the in-process simulator
    async with openai_client(gw.base_url) as c:
        yield c


async def streamed(client, **kwargs):
    stream = await client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    return [c async for c in stream]


async def test_a_tool_call_streamed_and_not(client):
    answer = await client.chat.completions.create(model="gpt-4o", messages=ASK, tools=WEATHER)
    [call] = answer.choices[0].message.tool_calls
    assert answer.choices[0].finish_reason == "tool_calls" and answer.choices[0].message.content is None
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "sample city", "unit": "celsius", "days": 1,
                                                   "detail": {"hourly": True}}
    chunks = await streamed(client, model="gpt-4o", messages=ASK, tools=WEATHER)
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) > 2  # the arguments come in pieces
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens > 0


async def test_tool_choice_names_a_function_and_a_tool_result_gets_a_text_answer(client):
    named = await client.chat.completions.create(
        model="gpt-4o", messages=ASK, tools=WEATHER,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert named.choices[0].message.tool_calls[0].function.name == "get_time"
    assert named.choices[0].message.tool_calls[0].function.arguments == "{}"
    call = named.choices[0].message.tool_calls[0]
    followed = await client.chat.completions.create(model="gpt-4o", tools=WEATHER, messages=[
        *ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "12:00"}])
    assert followed.choices[0].finish_reason == "stop" and followed.choices[0].message.content
    assert followed.choices[0].message.tool_calls is None
    plain = await client.chat.completions.create(model="gpt-4o", messages=ASK, tools=WEATHER, tool_choice="none")
    assert plain.choices[0].message.content and plain.choices[0].message.tool_calls is None
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="gpt-4o", messages=ASK, tools=WEATHER,
                                             tool_choice={"type": "function", "function": {"name": "nope"}})


async def test_n_choices_streamed_and_not(client):
    answer = await client.chat.completions.create(model="gpt-4o", messages=ASK, n=3, max_tokens=6)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    texts = [c.message.content for c in answer.choices]
    assert len(set(texts)) == 3 and all(texts)
    assert answer.usage.completion_tokens == 18
    chunks = await streamed(client, model="gpt-4o", messages=ASK, n=3, max_tokens=6, seed=5)
    again = await client.chat.completions.create(model="gpt-4o", messages=ASK, n=3, max_tokens=6, seed=5)
    by_index = {i: "".join(ch.delta.content or "" for c in chunks for ch in c.choices if ch.index == i)
                for i in range(3)}
    assert by_index == {c.index: c.message.content for c in again.choices}
    finishes = sorted(ch.index for c in chunks for ch in c.choices if ch.finish_reason == "length")
    assert finishes == [0, 1, 2] and chunks[-1].usage.completion_tokens == 18
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="gpt-4o", messages=ASK, n=129)


async def test_logprobs_streamed_and_not(client):
    answer = await client.chat.completions.create(model="gpt-4o", messages=ASK, logprobs=True, top_logprobs=3,
                                                  max_tokens=5)
    content = answer.choices[0].logprobs.content
    assert "".join(t.token for t in content) == answer.choices[0].message.content
    assert all(t.logprob < 0 and len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token for t in content)
    assert all(bytes(t.bytes) == t.token.encode() for t in content)
    chunks = await streamed(client, model="gpt-4o", messages=ASK, logprobs=True, max_tokens=5)
    streamed_lps = [lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert len(streamed_lps) == 5 and all(lp.top_logprobs == [] for lp in streamed_lps)
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="gpt-4o", messages=ASK, top_logprobs=2)


def test_sample_of_a_schema():
    assert sample_of({"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": ["null", "string"]},
                                                       "c": {"type": "array"}}, "required": ["a", "b"]}) == {
        "a": 1.0, "b": "sample b"}
    assert sample_of({"type": "object", "properties": {"x": {"type": "boolean"}}}) == {"x": True}
    assert sample_of(None) == "sample value"
