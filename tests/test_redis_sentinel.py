"""Redis through Sentinel (``redis+sentinel://`` in ``redis.url``): the URL, the master found through a real
Sentinel, and a failover. Real redis-server processes on 127.0.0.1 (a master, a replica, a Sentinel)."""
from __future__ import annotations

import asyncio
import re
import time

import attrs
import openai
import pytest
import redis.asyncio as aioredis
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel

from proxy.config.schema import RedisConfig
from proxy.redis_url import SentinelTarget, check_redis_url, parse_sentinel_url
from proxy.testing import config_for
from tests.conftest import openai_client
from tests.helpers import CHAT
from tests.redis_server import RedisServer, SentinelServer

KEY = "ssegate:pl:{up0}:r"  # the provider_limits bucket of provider up0


def test_a_sentinel_url_names_the_sentinels_the_service_and_the_masters_login():
    target = parse_sentinel_url("redis+sentinel://app:s%40cret@10.0.0.1:26380,sentinel-b,[::1]:26381/cache/2"
                                "?sentinel_password=sp")
    assert target == SentinelTarget(sentinels=(("10.0.0.1", 26380), ("sentinel-b", 26379), ("::1", 26381)),
                                    service="cache", db=2, username="app", password="s@cret",
                                    sentinel_password="sp", ssl=False)
    assert parse_sentinel_url("rediss+sentinel://h/m").ssl is True
    assert parse_sentinel_url("redis://127.0.0.1:6379/0") is None


@pytest.mark.parametrize("url, says", [
    ("redis+sentinel://h:26379", "no service name"),
    ("redis+sentinel://h:port/m", "is not a number"),
    ("redis+sentinel://h/m/zero", "is not /<service>[/<db number>]"),
    ("redis+sentinel://h,,g/m", "empty"),
    ("redis+sentinel://h/m?db=1", "unknown query parameter 'db'"),
    ("redis://127.0.0.1:7000,127.0.0.1:7001", "Port"),  # a Cluster's node list
])
def test_a_bad_url_is_refused_saying_why(url, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        check_redis_url(url)


@pytest.fixture
def sentinel_group():
    """A master, its replica and a Sentinel watching them, started; stopped after the test."""
    master = RedisServer().start()
    replica = RedisServer(replica_of=master.port).start()
    sentinel = SentinelServer(master.port).start()
    yield master, replica, sentinel
    for server in (sentinel, replica, master):
        server.stop()


async def _wait_for(what: str, check, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.1)


async def _ask(client: openai.AsyncOpenAI) -> int:
    try:
        await client.chat.completions.create(model="m", messages=CHAT["messages"])
        return 200
    except openai.RateLimitError:
        return 429


async def test_replicas_share_state_through_the_master_the_sentinel_names(upstream, gateway_factory, sentinel_group):
    master, _, sentinel = sentinel_group
    config = config_for(upstream)
    config = attrs.evolve(config, redis=RedisConfig(url=sentinel.url),
                          providers=(attrs.evolve(config.providers[0], rate_limit=3),))
    gateways = [await gateway_factory(config), await gateway_factory(config)]
    clients = [openai_client(gw.base_url) for gw in gateways]
    assert [await _ask(c) for c in clients * 2] == [200, 200, 200, 429]
    for client in clients:
        await client.close()
    direct = aioredis.from_url(master.url)
    try:
        assert await direct.exists(KEY) == 1  # the bucket is on the master the Sentinel named
    finally:
        await direct.aclose()


async def test_when_the_master_dies_the_gateway_goes_on_with_the_replica_promoted(upstream, gateway_factory, sentinel_group):
    master, replica, sentinel = sentinel_group
    on_sentinel = aioredis.Redis(port=sentinel.port, decode_responses=True)
    on_replica = aioredis.Redis(port=replica.port, decode_responses=True)
    asker = Sentinel([("127.0.0.1", sentinel.port)])
    try:
        async def replica_known() -> bool:
            return len(await on_sentinel.execute_command("SENTINEL", "REPLICAS", sentinel.service)) == 1
        await _wait_for("the Sentinel knows the replica", replica_known)

        config = config_for(upstream)
        config = attrs.evolve(config, redis=RedisConfig(url=sentinel.url),
                              providers=(attrs.evolve(config.providers[0], rate_limit=2),))
        gw = await gateway_factory(config)
        client = openai_client(gw.base_url)
        assert await _ask(client) == 200  # one of the minute's two requests, taken on the first master

        async def replicated() -> bool:
            return await on_replica.exists(KEY) == 1
        await _wait_for("the bucket reached the replica", replicated)
        master.stop()  # the master dies; the Sentinel promotes the replica

        async def promoted() -> bool:  # (as a client of the Sentinel sees it: a master it names, up)
            try:
                _, port = await asker.discover_master(sentinel.service)
            except MasterNotFoundError:
                return False
            return port == replica.port and (await on_replica.info("replication"))["role"] == "master"
        await _wait_for("the replica is the master", promoted)

        # The second request of the minute goes, through the new master; the third finds the bucket empty there.
        # (A gateway still asking the old master would have fallen back to a local bucket, full, and let the third
        # through: with redis.url naming the first master itself, this fails.)
        assert [await _ask(client), await _ask(client)] == [200, 429]
        await client.close()
        assert len(upstream.requests) == 2
    finally:
        for client in (on_sentinel, on_replica, *asker.sentinels):
            await client.aclose()
