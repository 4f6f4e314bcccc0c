"""Outbound rate limits (``providers[].rate_limit``, the ``provider_limits`` plugin) and ``RouteDeclined``, the
way any ``upstream_request`` hook passes over a route. Real upstreams and gateways on 127.0.0.1, a real Redis,
the official ``openai`` SDK as the client."""
from __future__ import annotations

import textwrap
from typing import Any

import aiohttp
import attrs
import openai
import pytest
import redis.asyncio as aioredis

from proxy import RouteDeclined, hookimpl
from proxy.config import load_config
from proxy.config.load import ConfigError
from proxy.config.schema import RedisConfig
from proxy.testing import GatewayServer, Script, config_for
from tests.conftest import openai_client
from tests.helpers import CHAT

MESSAGES = CHAT["messages"]


def limited(config: Any, *limits: int | None) -> Any:
    """``config`` with ``rate_limit`` set on its providers, in order (None: no limit)."""
    providers = tuple(attrs.evolve(p, rate_limit=limit) for p, limit in zip(config.providers, limits))
    return attrs.evolve(config, providers=providers)


async def ask(client: openai.AsyncOpenAI, stream: bool) -> str:
    """One chat request; the name of the provider that answered it (``x-ssegate-provider``)."""
    raw = await client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES, stream=stream)
    if stream:
        async for _ in raw.parse():
            pass
    else:
        raw.parse()
    return raw.headers["x-ssegate-provider"]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_provider_at_its_rate_limit_is_passed_over_for_the_next_route(
        upstream, upstream2, gateway_factory, stream):
    gw = await gateway_factory(limited(config_for(upstream, upstream2), 2, None))
    client = openai_client(gw.base_url)
    answered = [await ask(client, stream) for _ in range(5)]
    await client.close()
    assert answered == ["up0", "up0", "up1", "up1", "up1"]
    assert len(upstream.requests) == 2 and len(upstream2.requests) == 3


async def test_with_no_route_left_the_client_gets_a_429_with_retry_after(upstream, gateway_factory):
    gw = await gateway_factory(limited(config_for(upstream), 1))
    client = openai_client(gw.base_url)
    assert await ask(client, stream=False) == "up0"
    for stream in (False, True):
        with pytest.raises(openai.RateLimitError) as info:
            await ask(client, stream)
        error, headers = info.value.body, info.value.response.headers
        assert error["code"] == "rate_limit_exceeded" and "'up0'" in error["message"]
        assert "1 requests per minute" in error["message"]
        assert int(headers["Retry-After"]) in range(58, 61)  # one request a minute: the next in ~60 s
        assert int(headers["retry-after-ms"]) in range(57_000, 60_001)
    await client.close()
    assert len(upstream.requests) == 1  # nothing was sent for the refused ones


async def test_retries_count_against_the_limit(upstream, upstream2, gateway_factory):
    upstream.script = Script(status=503)  # up0 fails every attempt it gets
    config = limited(config_for(upstream, upstream2, retry_attempts=5), 3, None)
    gw = await gateway_factory(attrs.evolve(config, retry=attrs.evolve(config.retry, backoff_base=0.01,
                                                                        backoff_max=0.02)))
    client = openai_client(gw.base_url)
    assert await ask(client, stream=False) == "up1"
    await client.close()
    assert len(upstream.requests) == 3  # three attempts took the three requests of the minute; the fourth went on


async def test_replicas_share_a_providers_limit_through_redis(upstream, gateway_factory, redis_url):
    config = attrs.evolve(limited(config_for(upstream), 3), redis=RedisConfig(url=redis_url))
    first, second = await gateway_factory(config), await gateway_factory(config)
    clients = [openai_client(gw.base_url) for gw in (first, second)]
    outcomes = []
    for client in clients * 2:
        try:
            outcomes.append(await ask(client, stream=False))
        except openai.RateLimitError:
            outcomes.append(429)
    for client in clients:
        await client.close()
    assert outcomes == ["up0", "up0", "up0", 429]
    assert len(upstream.requests) == 3
    r = aioredis.from_url(redis_url)
    try:
        assert await r.exists("ssegate:pl:{up0}:r") == 1
    finally:
        await r.aclose()


async def test_while_redis_is_down_each_process_holds_the_limit_itself(upstream, gateway_factory, redis_server):
    redis = RedisConfig(url=redis_server.url, socket_timeout=0.3, connect_timeout=0.3)
    gw = await gateway_factory(attrs.evolve(limited(config_for(upstream), 2), redis=redis))
    client = openai_client(gw.base_url)
    assert await ask(client, stream=False) == "up0"  # through Redis
    redis_server.stop()
    outcomes = []
    for _ in range(3):
        try:
            outcomes.append(await ask(client, stream=False))
        except openai.RateLimitError:
            outcomes.append(429)
    await client.close()
    # The local bucket was full: two more go, the third is refused. No request failed for want of Redis.
    assert outcomes == ["up0", "up0", 429]


async def test_the_plugin_joins_the_pipeline_only_when_a_provider_sets_a_limit(upstream, gateway_factory):
    plain = await gateway_factory(config_for(upstream))
    assert plain.gateway.plugin("provider_limits") is None
    assert not plain.gateway.pipeline.has_upstream_request  # no per-attempt hook: nothing to pay
    gw = await gateway_factory(limited(config_for(upstream), 100))
    assert gw.gateway.plugin("provider_limits") is not None
    assert gw.gateway.pipeline.has_upstream_request


class Budget:
    """A third-party plugin that declines every route to ``up0`` and records each exchange's attempts."""

    def __init__(self) -> None:
        self.attempts: list[list[dict[str, Any]]] = []

    @hookimpl
    def upstream_request(self, exchange, request):
        if request.route.provider == "up0":
            raise RouteDeclined(402, "The team's budget for up0 is spent.", reason="budget", code="budget_spent")

    @hookimpl
    def exchange_done(self, exchange):
        self.attempts.append(list(exchange.attempts))


async def test_a_plugin_declining_a_route_sends_the_request_to_the_next_one(upstream, upstream2, gateway_factory):
    budget = Budget()
    gw = await gateway_factory(config_for(upstream, upstream2, pipeline=["router", "budget"], retry_attempts=2),
                               plugins={"budget": budget})
    client = openai_client(gw.base_url)
    assert await ask(client, stream=True) == "up1"
    await client.close()
    assert upstream.requests == [] and len(upstream2.requests) == 1
    assert budget.attempts == [[{"provider": "up0", "model": "m", "error": "budget"},
                                {"provider": "up1", "model": "m"}]]  # declined once: no retry on up0


async def test_a_declined_request_with_no_other_route_gets_the_plugins_error(upstream, gateway_factory):
    gw = await gateway_factory(config_for(upstream, pipeline=["router", "budget"]), plugins={"budget": Budget()})
    client = openai_client(gw.base_url)
    with pytest.raises(openai.APIStatusError) as info:
        await ask(client, stream=False)
    await client.close()
    assert info.value.status_code == 402 and info.value.body["code"] == "budget_spent"
    assert upstream.requests == []


@pytest.mark.parametrize("value", ["0", "-5", "20000000000"])
def test_a_rate_limit_out_of_range_names_the_line_and_key(tmp_path, value):
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(f"""\
        providers:
          - name: a
            type: simulated
            rate_limit: {value}
        """))
    with pytest.raises(ConfigError) as info:
        load_config(str(path), env={})
    [problem] = info.value.problems
    assert (problem.line, problem.key) == (4, "providers[0].rate_limit")
    assert "between 1 and 10,000,000,000" in str(problem)


async def test_a_reload_does_not_hand_a_provider_a_fresh_minute(tmp_path, upstream):
    path = tmp_path / "ssegate.yaml"

    def write(timeout: int) -> None:
        path.write_text(textwrap.dedent(f"""\
            server: {{admin_key: adm}}
            providers:
              - {{name: up0, type: openai, base_url: "{upstream.base_url}", rate_limit: 2, timeout: {timeout}}}
            """))

    write(600)
    gw = await GatewayServer.start(load_config(str(path)), config_path=str(path))
    client = openai_client(gw.base_url)
    try:
        assert [await ask(client, stream=False) for _ in range(2)] == ["up0", "up0"]
        write(300)
        async with aiohttp.ClientSession() as s, s.post(gw.url + "/admin/reload",
                                                        headers={"Authorization": "Bearer adm"}) as r:
            assert r.status == 200, await r.text()
        assert gw.current is not gw.gateway
        with pytest.raises(openai.RateLimitError):
            await ask(client, stream=False)
        assert len(upstream.requests) == 2
    finally:
        await client.close()
        await gw.close()


def test_an_unknown_backend_is_refused_naming_the_choices():
    from plugins.provider_limits import ProviderLimitsConfig

    with pytest.raises(ValueError, match="backend must be one of auto, memory, redis; got 'mongo'"):
        ProviderLimitsConfig(backend="mongo")
