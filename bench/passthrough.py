"""The bare baseline ("1x"): the least an aiohttp proxy can do.

aiohttp + uvloop, ONE shared ``ClientSession`` (large ``TCPConnector`` limit, ``auto_decompress=False``, no
cookie jar, idle connections kept 60 s: as the gateway's). The handler POSTs the client's body to the upstream;
an event stream is relayed as a ``web.StreamResponse`` writing each ``iter_any()`` piece as it arrives, with no
parsing at all; any other answer is read whole and returned as a ``web.Response``.

    python -m bench.passthrough --upstream http://127.0.0.1:9100 --port 0   # prints "READY <port>"

``--lean`` serves the same relay written with the shortcuts the gateway takes through aiohttp (no router, whole
bodies taken with ``read_nowait``, stream reads with ``readany``, writes straight to the connection's writer):
the yardstick for what the gateway's features cost, apart from how it uses aiohttp.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Awaitable, Callable

import aiohttp
from aiohttp import web

__all__ = ["make_app"]

#: Seconds an idle upstream connection is kept: the gateway's ``keepalive_expiry`` in the benchmark's config. Both
#: then close the idle connections a wave of streams left at the same distance from it (aiohttp closes all that
#: expired in one callback: ~40 ms for 1,000 connections, which the TTFT rounds can catch).
KEEPALIVE_EXPIRY = 60.0
_UPSTREAM_HEADERS = {"Content-Type": "application/json", "Accept-Encoding": "identity"}


def make_app(upstream: str) -> web.Application:
    base = upstream.rstrip("/")
    session_box: list[aiohttp.ClientSession] = []

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        connector = aiohttp.TCPConnector(limit=10000, limit_per_host=0, keepalive_timeout=KEEPALIVE_EXPIRY)
        session_box.append(aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=30),
                                                 skip_auto_headers=("User-Agent",),
                                                 cookie_jar=aiohttp.DummyCookieJar()))
        yield
        await session_box[0].close()

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with session_box[0].post(base + request.path, data=body, headers=_UPSTREAM_HEADERS) as up:
            ctype = up.headers.get("Content-Type", "application/octet-stream")
            if ctype.startswith("text/event-stream"):
                resp = web.StreamResponse(status=up.status, headers={"Content-Type": ctype,
                                                                     "Cache-Control": "no-cache"})
                await resp.prepare(request)
                async for piece in up.content.iter_any():
                    await resp.write(piece)
                await resp.write_eof()
                return resp
            data = await up.read()
            return web.Response(status=up.status, body=data, headers={"Content-Type": ctype})

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/chat/completions", relay)
    return app


def make_lean_runner(upstream: str) -> tuple[web.BaseRunner, Callable[[], Awaitable[None]]]:
    """The passthrough written with the shortcuts the gateway takes through aiohttp (``--lean``): a low-level
    ``web.Server`` with no router, a body or answer that is all here taken with ``read_nowait``, stream reads with
    ``readany`` and writes straight to the connection's writer. What a bare proxy costs when it is as careful with
    aiohttp as the gateway is: the yardstick for the gateway's features alone."""
    base = upstream.rstrip("/")
    session_box: list[aiohttp.ClientSession] = []

    async def relay(request: web.BaseRequest) -> web.StreamResponse:
        if not session_box:
            session_box.append(aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=10000, limit_per_host=0, keepalive_timeout=KEEPALIVE_EXPIRY), auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=30), skip_auto_headers=("User-Agent",),
                cookie_jar=aiohttp.DummyCookieJar()))
        content = request.content
        body = content.read_nowait() if content.is_eof() else await request.read()
        up = await session_box[0].post(base + request.path, data=body, headers=_UPSTREAM_HEADERS)
        try:
            ctype = up.headers.get("Content-Type", "application/octet-stream")
            if ctype.startswith("text/event-stream"):
                resp = web.StreamResponse(status=up.status, headers={"Content-Type": ctype,
                                                                     "Cache-Control": "no-cache"})
                await resp.prepare(request)
                read, write = up.content.readany, request.writer.write
                while piece := await read():
                    await write(piece)
                await resp.write_eof()
                return resp
            upc = up.content
            data = upc.read_nowait() if upc.is_eof() else await up.read()
            return web.Response(status=up.status, body=data, headers={"Content-Type": ctype})
        finally:
            if not up.closed:
                up.close()

    async def close_session() -> None:
        if session_box:
            await session_box.pop().close()

    runner = web.ServerRunner(web.Server(relay, handler_cancellation=True), access_log=None, shutdown_timeout=1)
    return runner, close_session


async def serve(host: str, port: int, upstream: str, lean: bool = False) -> None:
    close_session = None
    if lean:
        runner, close_session = make_lean_runner(upstream)
    else:
        runner = web.AppRunner(make_app(upstream), access_log=None, handler_cancellation=True, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)  # as ssegate serve
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {bound}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        if close_session is not None:
            await close_session()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream", required=True, help="base URL of the upstream, e.g. http://127.0.0.1:9100")
    parser.add_argument("--lean", action="store_true",
                        help="the same shortcuts through aiohttp as the gateway takes (see make_lean_runner)")
    args = parser.parse_args()
    import uvloop

    uvloop.run(serve(args.host, args.port, args.upstream, args.lean))


if __name__ == "__main__":
    main()
