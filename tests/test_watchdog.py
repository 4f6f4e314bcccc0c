"""The watchdog's one timer: armed for the earliest deadline or keepalive a live request could reach, moved closer
when a new request or attempt needs it sooner, not armed at all while nothing is live; and the event-loop lag the
liveness probe reports (a congested loop, a loop blocked while requests were live)."""
from __future__ import annotations

import asyncio
import time

import aiohttp
import attrs
import orjson

from proxy.testing import Script, config_for
from tests.helpers import CHAT, read_stream

STREAM = {**CHAT, "stream": True}


async def get(url: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            return r.status, orjson.loads(await r.read())


def with_lag_threshold(config, seconds: float):
    return attrs.evolve(config, observability=attrs.evolve(config.observability, loop_lag_threshold=seconds))


async def test_no_timer_is_armed_once_nothing_is_live(upstream, gateway_factory):
    """After the last request, the timer it armed runs out once and is not armed again: an idle gateway sleeps."""
    gw = await gateway_factory(config_for(upstream, keepalive_interval=0.2))
    watchdog = gw.current.watchdog
    assert watchdog.running and watchdog._timer is None  # started, nothing to watch yet
    status, _, _ = await read_stream(gw.base_url + "/chat/completions", STREAM)
    assert status == 200 and not watchdog.guards
    for _ in range(40):  # bounded: the stream's keepalive was due 0.2 s after it started
        if watchdog._timer is None:
            break
        await asyncio.sleep(0.05)
    assert watchdog._timer is None


async def test_a_stream_needing_a_keepalive_sooner_moves_an_armed_timer_closer(upstream, gateway_factory):
    """A slow non-stream request arms the timer for its 600 s deadline; a stream that starts next needs its first
    keepalive after 0.1 s and gets it (the timer is moved, not left at 600 s)."""
    upstream.script = Script(texts=["late"], first_delay=0.8)
    gw = await gateway_factory(config_for(upstream, keepalive_interval=0.1))
    watchdog = gw.current.watchdog
    async with aiohttp.ClientSession() as s:
        slow = asyncio.ensure_future(s.post(gw.base_url + "/chat/completions", json=CHAT))
        for _ in range(40):
            if watchdog.guards:
                break
            await asyncio.sleep(0.02)
        assert watchdog._wake_at - asyncio.get_running_loop().time() > 500  # the non-stream deadline only
        status, _, events = await read_stream(gw.base_url + "/chat/completions", STREAM)
        async with await slow as resp:
            assert resp.status == 200
    assert status == 200
    first_data = next(i for i, e in enumerate(events) if e.startswith(b"data:"))
    assert first_data >= 2 and all(e == b": keepalive" for e in events[:first_data])


async def test_a_first_token_deadline_sooner_than_the_armed_timer_is_kept(upstream, upstream2, gateway_factory):
    """The attempt's first-token deadline (0.3 s) is earlier than the timer a slow non-stream request armed: the
    stream still times out on time and falls back to the second provider."""
    upstream.script = Script(texts=["too late"], first_delay=3.0)
    upstream2.script = Script(texts=["fallback"])
    gw = await gateway_factory(config_for(upstream, upstream2, first_token_timeout=0.3))
    watchdog = gw.current.watchdog
    async with aiohttp.ClientSession() as s:
        slow = asyncio.ensure_future(s.post(gw.base_url + "/chat/completions", json={**CHAT, "model": "up0/m"}))
        for _ in range(40):
            if watchdog.guards:
                break
            await asyncio.sleep(0.02)
        started = time.monotonic()
        status, _, events = await read_stream(gw.base_url + "/chat/completions", STREAM)
        waited = time.monotonic() - started
        slow.cancel()
    assert status == 200 and b"fallback" in b"".join(events)
    assert waited < 2.5  # not the first provider's 3 s: its first-token timeout fired


async def test_liveness_fails_while_the_loop_is_congested(upstream, gateway_factory):
    """A task that holds the loop 0.3 s at a time (sync work between awaits): a callback queued by the probe waits
    behind it, so /health/live reports the lag and answers 503; without it, 200."""
    gw = await gateway_factory(with_lag_threshold(config_for(upstream), 0.2))
    status, body = await get(gw.url + "/health/live")
    assert status == 200 and body["status"] == "ok" and body["loop_lag_seconds"] < 0.2
    stop = asyncio.Event()

    async def hog() -> None:
        while not stop.is_set():
            time.sleep(0.3)
            await asyncio.sleep(0)

    task = asyncio.ensure_future(hog())
    try:
        status, body = await get(gw.url + "/health/live")
    finally:
        stop.set()
        await task
    assert status == 503 and body["status"] == "stalled" and body["loop_lag_seconds"] >= 0.25
    status, body = await get(gw.url + "/health")
    assert body["checks"]["event_loop"]["status"] == "ok"  # the hog is gone


async def test_liveness_reports_a_block_the_watchdog_saw_while_a_stream_was_live(upstream, gateway_factory):
    """The loop is blocked for 0.8 s while a stream waits for its first token: the watchdog's timer, due for the
    keepalive, fires late, and the next probe reports that lateness."""
    upstream.script = Script(texts=["late"], first_delay=1.5)
    gw = await gateway_factory(with_lag_threshold(config_for(upstream, keepalive_interval=0.1), 0.5))
    watchdog = gw.current.watchdog
    stream = asyncio.ensure_future(read_stream(gw.base_url + "/chat/completions", STREAM))
    for _ in range(40):
        if watchdog.guards:
            break
        await asyncio.sleep(0.02)
    time.sleep(0.8)  # the whole loop stands still
    await asyncio.sleep(0.05)
    status, body = await get(gw.url + "/health/live")
    assert status == 503 and body["loop_lag_seconds"] >= 0.6
    status, _, events = await stream
    assert status == 200 and b"late" in b"".join(events)


async def test_keepalives_go_on_through_the_backoff_after_a_timeout(upstream, gateway_factory):
    """A first-token timeout drops the guard from the timer's count (it expired); the backoff before the retry
    must count it again, or a stream waiting out the backoff gets no keepalive."""
    from proxy.config.schema import RetryConfig

    upstream.script = Script(texts=["late"], first_delay=2.0)
    config = config_for(upstream, keepalive_interval=0.15, first_token_timeout=0.3, retry_attempts=1)
    gw = await gateway_factory(attrs.evolve(config, retry=RetryConfig(backoff_base=0.9, jitter=False)))
    stream = asyncio.ensure_future(read_stream(gw.base_url + "/chat/completions", STREAM))
    for _ in range(100):  # bounded: 2 s
        if upstream.requests:
            break
        await asyncio.sleep(0.02)
    upstream.script = Script(texts=["in time"])  # the retry answers at once
    status, _, events = await stream
    assert status == 200 and len(upstream.requests) == 2
    content = next(i for i, e in enumerate(events) if e.startswith(b"data:"))
    # ~2 keepalives before the timeout at 0.3 s, ~6 in the 0.9 s backoff
    assert sum(1 for e in events[:content] if e.startswith(b": keepalive")) >= 6
