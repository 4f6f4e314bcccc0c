"""The gateway in front of `ssegate simulate` running as a real process, with the openai SDK as client."""
from __future__ import annotations

import pytest

from proxy.testing import config_for
from tests.conftest import openai_client


@pytest.fixture
async def gw(simulator_process, gateway_factory):
    return await gateway_factory(config_for(simulator_process))


async def test_stream_matches_non_stream_for_a_seed(gw):
    client = openai_client(gw.base_url)
    messages = [{"role": "user", "content": "Tell me something"}]
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True, seed=42,
                                                  max_tokens=20)
    chunks = [c async for c in stream]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert all(c.usage is None for c in chunks)  # usage was requested upstream but not by this client
    whole = await client.chat.completions.create(model="gpt-4o-mini", messages=messages, seed=42, max_tokens=20)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"
    assert len({c.id for c in chunks}) == 1
    await client.close()


async def test_completions_embeddings_models(gw):
    client = openai_client(gw.base_url)
    legacy = await client.completions.create(model="gpt-4o-mini", prompt="Once upon", max_tokens=6)
    assert legacy.usage.completion_tokens == 6 and legacy.choices[0].text
    parts = []
    stream = await client.completions.create(model="gpt-4o-mini", prompt="Once upon", max_tokens=6, stream=True)
    async for c in stream:
        parts.append(c.choices[0].text if c.choices else "")
    assert "".join(parts)
    emb = await client.embeddings.create(model="text-embedding-3-small", input="hello", dimensions=8)
    assert len(emb.data[0].embedding) == 8
    await client.close()


async def test_upstream_404_passes_through(gw):
    import openai

    client = openai_client(gw.base_url)
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["code"] == "model_not_found"
    await client.close()
