"""Routing with what the upstreams list themselves (``/v1/models`` discovery): a ``models: ["*"]`` server does not
take the requests for a model its own list lacks, and a model id with a ``/`` (vLLM's ``openai/gpt-oss-20b``) is
that model, not a model of the provider named by its first part. Real upstream servers on 127.0.0.1 and the
official ``openai`` SDK."""
from __future__ import annotations

from proxy.config.schema import Config, PipelineEntry, ProviderConfig
from proxy.testing import ScriptedUpstream
from tests.conftest import openai_client
from tests.helpers import CHAT


def two_providers(first: tuple[str, ScriptedUpstream, tuple[str, ...]],
                  second: tuple[str, ScriptedUpstream, tuple[str, ...]]) -> Config:
    providers = tuple(ProviderConfig(name=name, type="openai", base_url=up.base_url, models=models, priority=i + 1)
                      for i, (name, up, models) in enumerate((first, second)))
    return Config(providers=providers, pipeline=(PipelineEntry("router"),))


async def test_a_wildcard_server_whose_own_list_lacks_the_model_leaves_it_to_the_one_that_has_it(
        upstream, upstream2, gateway_factory):
    upstream.model_list = ["meta-llama/Llama-3.1-8B-Instruct"]  # vLLM, models: ["*"], priority 1
    gw = await gateway_factory(two_providers(("vllm", upstream, ("*",)), ("ollama", upstream2, ("llama3.2:latest",))))
    client = openai_client(gw.base_url)
    # before anyone asked for the lists, the wildcard server is tried first (priority)
    await client.chat.completions.create(model="llama3.2:latest", messages=CHAT["messages"])
    assert [r["model"] for r in upstream.requests] == ["llama3.2:latest"]
    listed = [m.id async for m in client.models.list()]  # asks vLLM for its own list
    assert "meta-llama/Llama-3.1-8B-Instruct" in listed and "llama3.2:latest" in listed
    answer = await client.chat.completions.create(model="llama3.2:latest", messages=CHAT["messages"])
    assert answer.choices[0].message.content == "Hello, world!"
    assert len(upstream.requests) == 1 and [r["model"] for r in upstream2.requests] == ["llama3.2:latest"]
    # what vLLM lists still goes to vLLM, and a name nobody lists still tries every match in priority order
    await client.chat.completions.create(model="meta-llama/Llama-3.1-8B-Instruct", messages=CHAT["messages"])
    await client.chat.completions.create(model="mistral-7b", messages=CHAT["messages"])
    await client.close()
    assert [r["model"] for r in upstream.requests[1:]] == ["meta-llama/Llama-3.1-8B-Instruct", "mistral-7b"]


async def test_a_model_id_with_a_slash_that_an_upstream_lists_is_that_model(upstream, upstream2, gateway_factory):
    upstream2.model_list = ["openai/gpt-oss-20b"]
    gw = await gateway_factory(two_providers(("openai", upstream, ("gpt-4o",)), ("vllm", upstream2, ("*",))))
    client = openai_client(gw.base_url)
    await client.chat.completions.create(model="openai/gpt-4o", messages=CHAT["messages"])  # provider/model
    assert [r["model"] for r in upstream.requests] == ["gpt-4o"]
    assert "openai/gpt-oss-20b" in [m.id async for m in client.models.list()]
    answer = await client.chat.completions.create(model="openai/gpt-oss-20b", messages=CHAT["messages"])
    await client.close()
    assert answer.choices[0].message.content == "Hello, world!"
    assert [r["model"] for r in upstream2.requests] == ["openai/gpt-oss-20b"]  # the whole id, to vLLM
    assert len(upstream.requests) == 1
