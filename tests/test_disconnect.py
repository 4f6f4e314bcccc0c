"""A client that goes away cancels the upstream request at once; exchange_done still runs, once."""
from __future__ import annotations

import asyncio

import aiohttp
import orjson

from proxy import Outcome, hookimpl
from proxy.testing import Script, config_for
from tests.helpers import CHAT


class Recorder:
    def __init__(self) -> None:
        self.done: list = []
        self.event = asyncio.Event()

    @hookimpl
    def exchange_done(self, exchange):
        self.done.append(exchange)
        self.event.set()


async def _start(upstream, gateway_factory):
    rec = Recorder()
    gw = await gateway_factory(config_for(upstream, pipeline=["rec", "router"]), plugins={"rec": rec})
    return gw, rec


async def test_disconnect_mid_stream_cancels_upstream(upstream, gateway_factory):
    upstream.script = Script(texts=[f"t{i}" for i in range(100)], delay=0.05)
    gw, rec = await _start(upstream, gateway_factory)
    async with aiohttp.ClientSession() as s:
        resp = await s.post(gw.base_url + "/chat/completions", data=orjson.dumps({**CHAT, "stream": True}))
        seen = 0
        async for line in resp.content:
            if line.startswith(b"data: {"):
                seen += 1
            if seen == 3:
                break
        resp.close()
    await asyncio.wait_for(upstream.cancel_event.wait(), 2)
    await asyncio.wait_for(rec.event.wait(), 2)
    await asyncio.sleep(0.1)
    assert upstream.cancelled == 1 and upstream.completed == 0
    assert len(rec.done) == 1
    assert rec.done[0].outcome == Outcome.CLIENT_DISCONNECT and rec.done[0].status == 499


async def test_disconnect_before_first_byte_cancels_upstream(upstream, gateway_factory):
    upstream.script = Script(first_delay=5)
    gw, rec = await _start(upstream, gateway_factory)
    async with aiohttp.ClientSession() as s:
        task = asyncio.create_task(s.post(gw.base_url + "/chat/completions", json={**CHAT, "stream": True}))
        await asyncio.sleep(0.3)
        task.cancel()
    await asyncio.wait_for(upstream.cancel_event.wait(), 2)
    await asyncio.wait_for(rec.event.wait(), 2)
    assert rec.done[0].outcome == Outcome.CLIENT_DISCONNECT


async def test_disconnect_non_stream_cancels_upstream(upstream, gateway_factory):
    upstream.script = Script(first_delay=5)
    gw, rec = await _start(upstream, gateway_factory)
    async with aiohttp.ClientSession() as s:
        task = asyncio.create_task(s.post(gw.base_url + "/chat/completions", json=CHAT))
        await asyncio.sleep(0.3)
        task.cancel()
    await asyncio.wait_for(upstream.cancel_event.wait(), 2)
    await asyncio.wait_for(rec.event.wait(), 2)
    assert len(rec.done) == 1 and rec.done[0].outcome == Outcome.CLIENT_DISCONNECT


async def test_pooled_connection_is_released_after_disconnect(upstream, gateway_factory):
    """With a pool of one connection, a later request still gets through after a client left mid-stream."""
    upstream.script = Script(texts=[f"t{i}" for i in range(50)], delay=0.05)
    rec = Recorder()
    gw = await gateway_factory(config_for(upstream, pipeline=["rec", "router"], max_connections=1),
                               plugins={"rec": rec})
    async with aiohttp.ClientSession() as s:
        resp = await s.post(gw.base_url + "/chat/completions", json={**CHAT, "stream": True})
        await resp.content.readline()
        resp.close()
        await asyncio.wait_for(upstream.cancel_event.wait(), 2)
        upstream.script = Script(texts=["again"])
        async with s.post(gw.base_url + "/chat/completions", json=CHAT) as r2:
            assert (await r2.json())["choices"][0]["message"]["content"] == "again"


async def test_client_gone_while_the_answer_is_written_is_not_an_error(upstream, gateway_factory):
    """A write to a client connection that is closing (aiohttp raises ClientConnectionResetError) ends the
    exchange as a client disconnect: no error log with a traceback, no 500, exchange_done once."""
    from structlog.testing import capture_logs

    class ClosesTheClientConnection:
        """Closes the server side of the client's connection just before the gateway writes the answer."""

        def __init__(self) -> None:
            self.server = None

        @hookimpl
        def on_response(self, exchange, body):
            for handler in self.server.connections:
                handler.transport.close()

    rec, closer = Recorder(), ClosesTheClientConnection()
    gw = await gateway_factory(config_for(upstream, pipeline=["rec", "closer", "router"]),
                               plugins={"rec": rec, "closer": closer})
    closer.server = gw.runner.server
    with capture_logs() as logs:
        async with aiohttp.ClientSession() as s:
            try:
                async with s.post(gw.base_url + "/chat/completions", json=CHAT) as resp:
                    await resp.read()
            except aiohttp.ClientError:
                pass  # the connection closed without an answer, as it should
        await asyncio.wait_for(rec.event.wait(), 2)
    assert len(rec.done) == 1 and rec.done[0].outcome == Outcome.CLIENT_DISCONNECT and rec.done[0].status == 499
    assert not [e for e in logs if e["log_level"] in ("error", "critical")], logs
