"""The upstream pool keeps at most ``max_keepalive_connections`` idle connections per provider: after a burst,
the rest are closed as they are released, and the next burst reuses only the ones kept (seen from the upstream,
by the client port each request arrives from)."""
from __future__ import annotations

import asyncio

import aiohttp

from proxy.testing import Script, config_for
from tests.helpers import CHAT


async def two_bursts(gw, upstream, size: int = 8) -> tuple[set, set]:
    """Two bursts of ``size`` concurrent requests, each held 0.3 s at the upstream so they overlap; the client
    ports each burst's requests came from."""
    async def one(session: aiohttp.ClientSession) -> None:
        async with session.post(gw.base_url + "/chat/completions", json=CHAT) as resp:
            assert resp.status == 200
            await resp.read()

    ports = []
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            start = len(upstream.peers)
            await asyncio.gather(*(one(session) for _ in range(size)))
            ports.append({port for _, port in upstream.peers[start:]})
            await asyncio.sleep(0.05)  # the released connections are back in the pool (or closed)
    assert len(ports[0]) == size  # the burst needed a connection per request
    return ports[0], ports[1]


async def test_a_burst_leaves_at_most_max_keepalive_connections_for_the_next(upstream, gateway_factory):
    upstream.script = Script(texts=["ok"], first_delay=0.3)
    gw = await gateway_factory(config_for(upstream, max_connections=50, max_keepalive_connections=2))
    first, second = await two_bursts(gw, upstream)
    assert len(first & second) == 2 and len(second) == 8


async def test_with_room_for_all_every_connection_is_reused(upstream, gateway_factory):
    upstream.script = Script(texts=["ok"], first_delay=0.3)
    gw = await gateway_factory(config_for(upstream, max_connections=50))  # max_keepalive_connections: 100
    first, second = await two_bursts(gw, upstream)
    assert first == second


async def test_zero_keeps_no_connection(upstream, gateway_factory):
    upstream.script = Script(texts=["ok"], first_delay=0.3)
    gw = await gateway_factory(config_for(upstream, max_connections=50, max_keepalive_connections=0))
    first, second = await two_bursts(gw, upstream)
    assert not first & second


async def test_a_pool_that_cannot_exceed_the_cap_gets_aiohttps_own_connector():
    """The hook costs a call per released connection; where ``limit`` bounds the idle ones anyway it is left out."""
    from proxy.pool import CAN_CAP, IdleCappedConnector, connector

    assert CAN_CAP  # this aiohttp has the hook (else the cap would be off everywhere, with a warning)
    made = [connector(max_idle=100, limit=100), connector(max_idle=2000, limit=2000),
            connector(max_idle=100, limit=101), connector(max_idle=100, limit=0), connector(max_idle=0, limit=50)]
    try:
        assert [isinstance(c, IdleCappedConnector) for c in made] == [False, False, True, True, True]
    finally:
        for c in made:
            await c.close()
