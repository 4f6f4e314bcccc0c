"""``GET /v1/models/{model}`` (the OpenAI SDK's ``client.models.retrieve``): the object ``/v1/models`` lists,
for listed and wildcard-served models and ids with a ``/``; 404 ``model_not_found`` for the rest and for what a
key may not use; the auth plugin's 401; 405 for other methods; ``exchange_done`` once per request."""
from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest

from proxy import Outcome
from proxy.config.schema import PipelineEntry
from proxy.testing import config_for
from tests.conftest import openai_client
from tests.helpers import Recorder

ALICE = "sk-test-alice-4f9a1c0e7b2d"  # may use gpt-4o-mini only
BOB = "sk-test-bob-93c1d0a8e5f7"  # may use everything

#: The provider's models: two concrete names (listed by /v1/models) and a pattern (matched, never listed).
MODELS = ("gpt-4o-mini", "meta-llama/Llama-3-8B", "gpt-4*")


async def start(upstream, gateway_factory, *, auth: bool = False, recorder: Recorder | None = None, **options):
    pipeline: list = []
    if auth:
        pipeline.append(PipelineEntry("auth", {"keys_env": None,
                                               "keys": [f"{ALICE} name=alice models=gpt-4o-mini", f"{BOB} name=bob"]}))
    if recorder is not None:
        pipeline.append("rec")
    pipeline.append("router")
    config = config_for(upstream, pipeline=pipeline, models=MODELS, **options)
    return await gateway_factory(config, plugins={"rec": recorder} if recorder is not None else None)


def assert_model_not_found(err: openai.NotFoundError, model: str) -> None:
    assert err.status_code == 404
    assert err.code == "model_not_found"
    assert err.body == {"message": f"The model `{model}` does not exist or you do not have access to it.",
                        "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    assert err.response.headers["X-Request-ID"]


async def test_retrieve_returns_the_models_list_entry(upstream, gateway_factory):
    gw = await start(upstream, gateway_factory)
    async with openai_client(gw.base_url) as client:
        listed = {m.id: m async for m in client.models.list()}
        assert list(listed) == ["gpt-4o-mini", "meta-llama/Llama-3-8B"]
        raw = await client.models.with_raw_response.retrieve("gpt-4o-mini")
        model = raw.parse()
    assert raw.http_response.status_code == 200 and raw.headers["X-Request-ID"]
    entry = listed["gpt-4o-mini"]
    retrieved, in_list = model.to_dict(), entry.to_dict()  # the fields as they came over the wire
    assert retrieved.pop("created") - in_list.pop("created") in (0, 1)  # both "now", the second may have turned
    assert retrieved == in_list == {"id": "gpt-4o-mini", "object": "model", "owned_by": "ssegate"}
    assert isinstance(model.created, int)
    async with aiohttp.ClientSession() as s:  # beside /v1/models, /models answers too
        async with s.get(gw.url + "/models/gpt-4o-mini") as resp:
            assert resp.status == 200 and resp.headers["X-Request-ID"]
            assert set(await resp.json()) == {"id", "object", "created", "owned_by"}
    assert upstream.requests == []  # answered by the gateway, no provider asked


async def test_retrieve_a_model_served_by_a_wildcard_pattern(upstream, gateway_factory):
    gw = await start(upstream, gateway_factory)
    async with openai_client(gw.base_url) as client:
        assert "gpt-4o" not in [m.id async for m in client.models.list()]  # a pattern is never listed...
        model = await client.models.retrieve("gpt-4o")  # ...but gpt-4o is served, as chat would route it
    assert (model.id, model.object, model.owned_by) == ("gpt-4o", "model", "ssegate")


async def test_retrieve_an_id_with_a_slash(upstream, gateway_factory):
    gw = await start(upstream, gateway_factory)
    async with openai_client(gw.base_url) as client:
        model = await client.models.retrieve("meta-llama/Llama-3-8B")  # the SDK sends it as meta-llama%2FLlama...
    assert model.id == "meta-llama/Llama-3-8B"
    async with aiohttp.ClientSession() as s:  # curl-style, the slash raw, on both prefixes
        for path in ("/v1/models/meta-llama/Llama-3-8B", "/models/meta-llama/Llama-3-8B"):
            async with s.get(gw.url + path) as resp:
                assert resp.status == 200, path
                assert (await resp.json())["id"] == "meta-llama/Llama-3-8B"


async def test_unknown_model_is_404_model_not_found(upstream, gateway_factory):
    gw = await start(upstream, gateway_factory)
    async with openai_client(gw.base_url) as client:
        for unknown in ("llama-3", "meta-llama/Llama-3-70B", "openai/gpt-3.5-turbo"):
            with pytest.raises(openai.NotFoundError) as info:
                await client.models.retrieve(unknown)
            assert_model_not_found(info.value, unknown)


async def test_retrieve_agrees_with_chat_on_the_simulated_provider(gateway_factory):
    """The embedded default's shape: the provider routes every model (``models: ["*"]``) to a simulator that serves
    only its own ``simulation.models``. What chat would answer 404, ``models.retrieve`` answers 404 too."""
    from proxy.config.load import load_config

    gw = await gateway_factory(load_config(env={}))
    messages = [{"role": "user", "content": "hi"}]
    async with openai_client(gw.base_url) as client:
        listed = [m.id async for m in client.models.list()]
        assert "gpt-4o-mini" in listed
        for model in listed:  # every listed model is retrieved, and answered
            assert (await client.models.retrieve(model)).id == model
        answer = await client.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=2)
        assert answer.choices[0].message.content
        with pytest.raises(openai.NotFoundError) as chat_info:
            await client.chat.completions.create(model="llama-3", messages=messages)
        with pytest.raises(openai.NotFoundError) as retrieve_info:
            await client.models.retrieve("llama-3")
    assert chat_info.value.code == "model_not_found"
    assert_model_not_found(retrieve_info.value, "llama-3")


async def test_disabled_provider_serves_nothing(upstream, gateway_factory):
    gw = await start(upstream, gateway_factory, enabled=False)
    async with openai_client(gw.base_url) as client:
        with pytest.raises(openai.NotFoundError) as info:
            await client.models.retrieve("gpt-4o-mini")
    assert_model_not_found(info.value, "gpt-4o-mini")


async def test_other_methods_are_405_and_neighbours_unchanged(upstream, gateway_factory):
    gw = await start(upstream, gateway_factory)
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.base_url + "/models") as resp:  # the list's 405, for comparison
            assert resp.status == 405
            allow = resp.headers["Allow"]
        assert set(allow.replace(" ", "").split(",")) == {"GET", "HEAD"}
        for method, path in (("POST", "/v1/models/gpt-4o-mini"), ("DELETE", "/v1/models/meta-llama/Llama-3-8B"),
                             ("PUT", "/models/gpt-4o")):
            async with s.request(method, gw.url + path) as resp:
                assert resp.status == 405, (method, path)
                body = await resp.json()
                assert body["error"]["code"] == "method_not_allowed" and body["error"]["type"]
                assert resp.headers["Allow"] == allow and resp.headers["X-Request-ID"]
        async with s.head(gw.base_url + "/models/gpt-4o") as resp:
            assert resp.status == 200
        # the list is not shadowed, an empty id is no model, and other unknown paths stay 404 / 405
        async with s.get(gw.base_url + "/models") as resp:
            assert resp.status == 200 and (await resp.json())["object"] == "list"
        for path in ("/v1/models/", "/v1/modelsx/gpt-4o", "/v1/model/gpt-4o"):
            async with s.get(gw.url + path) as resp:
                assert resp.status == 404, path
                assert (await resp.json())["error"]["code"] == "not_found"
        async with s.get(gw.base_url + "/models/gpt-4o") as resp:
            assert resp.status == 200


async def test_auth_401_without_key_and_404_for_a_model_the_key_may_not_use(upstream, gateway_factory):
    gw = await start(upstream, gateway_factory, auth=True)
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.base_url + "/models/gpt-4o-mini") as resp:
            assert resp.status == 401 and resp.headers["X-Request-ID"]
            assert (await resp.json())["error"]["code"] == "missing_api_key"
    async with openai.AsyncOpenAI(base_url=gw.base_url, api_key="sk-wrong-key-0123456789xyz", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError) as info:
            await c.models.retrieve("gpt-4o-mini")
        assert info.value.code == "invalid_api_key"
    async with openai.AsyncOpenAI(base_url=gw.base_url, api_key=ALICE, max_retries=0) as alice:
        assert (await alice.models.retrieve("gpt-4o-mini")).id == "gpt-4o-mini"
        for hidden in ("gpt-4o", "meta-llama/Llama-3-8B"):  # served, but not to alice: answered as unknown
            with pytest.raises(openai.NotFoundError) as info:
                await alice.models.retrieve(hidden)
            assert_model_not_found(info.value, hidden)
    async with openai.AsyncOpenAI(base_url=gw.base_url, api_key=BOB, max_retries=0) as bob:
        assert (await bob.models.retrieve("gpt-4o")).id == "gpt-4o"
        assert (await bob.models.retrieve("meta-llama/Llama-3-8B")).id == "meta-llama/Llama-3-8B"
    assert upstream.requests == []


async def test_exchange_done_runs_once_per_request(upstream, gateway_factory):
    rec = Recorder()
    gw = await start(upstream, gateway_factory, auth=True, recorder=rec)
    async with openai.AsyncOpenAI(base_url=gw.base_url, api_key=BOB, max_retries=0) as bob:
        await bob.models.retrieve("gpt-4o-mini")
        await bob.models.retrieve("meta-llama/Llama-3-8B")
        with pytest.raises(openai.NotFoundError):
            await bob.models.retrieve("llama-3")
    async with openai.AsyncOpenAI(base_url=gw.base_url, api_key=ALICE, max_retries=0) as alice:
        with pytest.raises(openai.NotFoundError):
            await alice.models.retrieve("gpt-4o")
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.base_url + "/models/gpt-4o", headers={"X-Request-ID": "no-key-1"}) as resp:
            assert resp.status == 401
    await asyncio.sleep(0.05)
    assert [(e.endpoint, e.model, e.status, e.outcome) for e in rec.done] == [
        ("models", "gpt-4o-mini", 200, Outcome.OK),
        ("models", "meta-llama/Llama-3-8B", 200, Outcome.OK),
        ("models", "llama-3", 404, Outcome.REJECTED),
        ("models", "gpt-4o", 404, Outcome.REJECTED),
        ("models", "gpt-4o", 401, Outcome.REJECTED),
    ]
    assert len({e.request_id for e in rec.done}) == 5 and rec.done[-1].request_id == "no-key-1"
    assert [e.principal.name if e.principal else None for e in rec.done] == ["bob", "bob", "bob", "alice", None]
    assert all(e.ended is not None and e.ended >= e.started for e in rec.done)


async def test_models_lists_what_a_wildcard_upstream_serves(upstream, gateway_factory):
    """A provider with model patterns (``["*"]`` for a vLLM or Ollama server, say) lists the upstream's own models
    that the patterns match, as chat front ends fill their model menus from ``/v1/models``; asked once per TTL,
    with the provider's key, concurrent calls sharing one request."""
    upstream.model_list = ["gpt-4o", "gpt-4o-mini", "llama-3-8b", "gpt-4o"]
    config = config_for(upstream, models=("gpt-4o-mini", "gpt-4*"), api_key="sk-upstream")
    gw = await gateway_factory(config)
    async with openai_client(gw.base_url) as client:
        lists = await asyncio.gather(*(client.models.list() for _ in range(3)))
        assert [[m.id async for m in page] for page in lists] == [["gpt-4o-mini", "gpt-4o"]] * 3
        upstream.model_list = ["gpt-4-turbo"]
        assert [m.id async for m in await client.models.list()] == ["gpt-4o-mini", "gpt-4o"]  # within the TTL
    assert upstream.model_list_requests == 1
    assert upstream.headers[-1]["Authorization"] == "Bearer sk-upstream"
    gw.current.providers["up0"].discovered_until = 0  # the TTL has passed
    async with openai_client(gw.base_url) as client:
        assert [m.id async for m in await client.models.list()] == ["gpt-4o-mini", "gpt-4-turbo"]


async def test_models_keeps_its_list_when_the_upstream_cannot_say(upstream, gateway_factory):
    upstream.model_list = ["llama-3-8b"]
    gw = await gateway_factory(config_for(upstream, discover_models_ttl=0.0))
    async with openai_client(gw.base_url) as client:
        assert [m.id async for m in await client.models.list()] == ["llama-3-8b"]
        upstream.model_list = None  # now 404
        assert [m.id async for m in await client.models.list()] == ["llama-3-8b"]
    assert upstream.model_list_requests == 2
    dead = await gateway_factory(config_for("http://127.0.0.1:9/v1"))  # nothing listens: answered at once
    async with openai_client(dead.base_url) as client:
        assert [m.id async for m in await client.models.list()] == []


async def test_discovery_can_be_turned_off(upstream, gateway_factory):
    upstream.model_list = ["llama-3-8b"]
    gw = await gateway_factory(config_for(upstream, discover_models=False))
    async with openai_client(gw.base_url) as client:
        assert [m.id async for m in await client.models.list()] == []
    assert upstream.model_list_requests == 0
