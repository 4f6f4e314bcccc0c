"""The upstream pool keeps at most ``max_keepalive_connections`` idle connections per provider: after a burst,
the rest are closed as they are released, and the next burst reuses only the ones kept (seen from the upstream,
by the client port each request arrives from). Idle connections that expire together are taken out of the pool
before they expire and closed a batch per loop iteration, not by the next request."""
from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp import web

from proxy.pool import CLOSE_BATCH, SweepingConnector
from proxy.testing import Script, config_for
from tests.helpers import CHAT, CatchAllUpstream


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
        assert all(isinstance(c, SweepingConnector) for c in made)
    finally:
        for c in made:
            await c.close()


class HeldUpstream(CatchAllUpstream):
    """Answers once ``size`` requests are in, so that a burst opens one connection per request."""

    def __init__(self, size: int) -> None:
        self.size, self.arrived, self.all_in = size, 0, asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.arrived += 1
        if self.arrived % self.size == 0:
            self.all_in.set()
        await asyncio.wait_for(self.all_in.wait(), 10)
        return web.json_response({"ok": True})


async def idle_burst(size: int, keepalive: float, armed: bool = True):
    """A sweeping pool with ``size`` idle connections to a real upstream, released together; and the session."""
    upstream = await HeldUpstream(size).start()
    session = aiohttp.ClientSession(connector=SweepingConnector(limit=0, keepalive_timeout=keepalive))

    async def one() -> None:
        async with session.post(upstream.base_url + "/x", data=b"{}") as resp:
            assert resp.status == 200
            await resp.read()

    await asyncio.gather(*(one() for _ in range(size)))
    released = time.monotonic()
    if not armed:  # the test runs the sweep itself
        session.connector._cleanup_handle.cancel()
        session.connector._cleanup_handle = None
    protos = [proto for conns in session.connector._conns.values() for proto, _ in conns]
    assert len(protos) == size
    return upstream, session, protos, released


def closed(proto) -> bool:
    return proto.transport is None or proto.transport.is_closing()


async def test_expired_idle_connections_are_closed_a_batch_per_loop_iteration():
    size = CLOSE_BATCH * 2 + 10
    upstream, session, protos, _ = await idle_burst(size, keepalive=0.3, armed=False)
    try:
        await asyncio.sleep(0.35)  # all expired
        connector = session.connector
        connector._cleanup()
        assert not connector._conns  # out of the pool: no request can meet them
        counts = [sum(map(closed, protos))]
        for _ in range(3):
            await asyncio.sleep(0)
            counts.append(sum(map(closed, protos)))
        assert counts == [CLOSE_BATCH, 2 * CLOSE_BATCH, size, size]
    finally:
        await session.close()
        await upstream.close()


async def test_idle_connections_leave_the_pool_before_they_expire_without_any_request():
    """The sweep aiohttp arms on the first release runs when due, takes what would expire before the next sweep,
    and arms the next one ahead of the oldest connection left; so a request never finds an expired connection."""
    upstream, session, protos, released = await idle_burst(20, keepalive=1.0)
    connector = session.connector
    try:
        # Ten more released a little later: two generations of idle connections.
        await asyncio.sleep(0.4)
        upstream.size, upstream.arrived = 10, 0
        upstream.all_in.clear()

        async def one() -> None:
            async with session.post(upstream.base_url + "/x", data=b"{}") as resp:
                await resp.read()

        await asyncio.gather(*(one() for _ in range(10)))  # reuses 10 of the 20 (the oldest first)
        while connector._conns and time.monotonic() - released < 3:
            ages = [time.monotonic() - used for conns in connector._conns.values() for _, used in conns]
            assert max(ages) < 1.0  # never an expired connection in the pool
            await asyncio.sleep(0.02)
        assert not connector._conns
        assert all(map(closed, protos))
    finally:
        await session.close()
        await upstream.close()


async def test_closing_the_pool_closes_what_the_sweep_had_not_closed_yet():
    upstream, session, protos, _ = await idle_burst(CLOSE_BATCH + 20, keepalive=0.3, armed=False)
    try:
        await asyncio.sleep(0.35)
        connector = session.connector
        connector._cleanup()
        assert 0 < sum(map(closed, protos)) < len(protos)
        waiters = connector._close()  # (what close() runs first: it closes, then waits for the closes)
        assert all(map(closed, protos))
        await asyncio.gather(*waiters)
        assert not connector._doomed
    finally:
        await session.close()
        await upstream.close()


async def test_closing_the_idle_connections_of_a_retired_pool_takes_a_batch_per_loop_iteration():
    """What a reload's retired providers (and shutdown) do before closing their session."""
    size = CLOSE_BATCH * 3
    upstream, session, protos, _ = await idle_burst(size, keepalive=30.0, armed=False)
    try:
        task = asyncio.create_task(session.connector.close_idle())
        counts = []
        while not task.done() and len(counts) < 20:
            await asyncio.sleep(0)
            counts.append(sum(map(closed, protos)))
        await task
        steps = [b - a for a, b in zip([0, *counts], counts)]
        assert counts[-1] == size and max(steps) <= CLOSE_BATCH and len([s for s in steps if s]) >= 3, counts
        assert not session.connector._conns
    finally:
        await session.close()
        await upstream.close()
