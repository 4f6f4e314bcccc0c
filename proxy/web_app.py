"""Building the aiohttp application and serving it."""
from __future__ import annotations

import asyncio
import socket
from typing import AsyncIterator

from aiohttp import web

from .app_keys import GATEWAY, GatewayHolder
from .gateway import Gateway
from .web_handlers import routes
from .web_middlewares import add_request_id_header, gateway_middleware

__all__ = ["create_app", "start_server", "serve"]


def create_app(gateway: Gateway) -> web.Application:
    """The application for a (not yet started) Gateway; the app's startup starts it, cleanup closes it."""
    app = web.Application(client_max_size=gateway.config.server.max_request_size, middlewares=[gateway_middleware])
    app[GATEWAY] = GatewayHolder(gateway)
    app.on_response_prepare.append(add_request_id_header)
    app.add_routes(routes)

    async def gateway_ctx(app: web.Application) -> AsyncIterator[None]:
        await app[GATEWAY].current.start()
        yield
        await app[GATEWAY].current.close()

    app.cleanup_ctx.append(gateway_ctx)
    return app


async def start_server(app: web.Application, host: str, port: int, *, reuse_port: bool = False,
                       sock: socket.socket | None = None) -> tuple[web.AppRunner, int]:
    """Start serving; returns the runner and the bound port (useful with ``port=0``).

    Handlers are cancelled when their client disconnects (``handler_cancellation``), which is how a
    disconnect cancels the upstream request at once, before the first byte and for non-stream requests too.
    """
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=5)
    await runner.setup()
    if sock is not None:
        site: web.BaseSite = web.SockSite(runner, sock)
    else:
        site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None, backlog=1024)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, bound


async def serve(app: web.Application, host: str, port: int, *, reuse_port: bool = False,
                ready_message: bool = True) -> None:
    """Serve until SIGINT/SIGTERM."""
    import signal

    runner, bound = await start_server(app, host, port, reuse_port=reuse_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    if ready_message:
        print(f"ssegate listening on http://{host}:{bound}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
