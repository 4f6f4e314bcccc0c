"""Building the aiohttp application and serving it: signals, reload, graceful drain."""
from __future__ import annotations

import asyncio
import gc
import signal
import socket
from typing import Any, AsyncIterator

import structlog
from aiohttp import web

from .app_keys import DIRECT_ROUTES, GATEWAY, RELOADER, GatewayHolder
from .gateway import Gateway
from .reload import Reloader
from .tasks import stop_task
from .tls import server_context
from .web_handlers import api_routes, routes
from .web_middlewares import add_cors_headers, cors_middleware, edge, unmatched_route
from .web_runner import GatewayRunner

__all__ = ["create_app", "start_server", "serve", "drain"]

log = structlog.get_logger("ssegate.server")


def create_app(gateway: Gateway, config_path: str | None = None, configure_logs: bool = False,
               server_overrides: dict[str, Any] | None = None) -> web.Application:
    """The application for a (not yet started) Gateway; the app's startup starts it, cleanup closes it.

    ``config_path`` is where reloads read the config from (None: the embedded default); ``server_overrides``
    (command-line ``server`` settings) are applied to every reloaded config as they were to the first.
    """
    cors = gateway.config.cors
    # No middleware unless CORS is configured: aiohttp wraps every request in one more frame per middleware.
    # The handlers do the request id and the OpenAI-format errors themselves (web_middlewares.edge).
    middlewares = [cors_middleware(cors)] if cors.allow_origins else []
    app = web.Application(client_max_size=gateway.config.server.max_request_size, middlewares=middlewares)
    holder = GatewayHolder(gateway)
    app[GATEWAY] = holder
    app[RELOADER] = Reloader(holder, config_path, configure_logs, server_overrides)
    if cors.allow_origins:
        app.on_response_prepare.append(add_cors_headers(cors))
    api = api_routes(holder)
    app.add_routes(api)
    if not middlewares:
        app[DIRECT_ROUTES] = {route.path: route.handler for route in api}
    app.add_routes(routes)
    known: dict[str, set[str]] = {}
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else None
        if path is not None:
            known.setdefault(path, set()).add(route.method)
    app.router.add_route("*", "/{tail:.*}", _recorded(holder, edge(unmatched_route(known))))  # last: the rest

    async def gateway_ctx(app: web.Application) -> AsyncIterator[None]:
        await app[GATEWAY].current.start()
        yield
        await app[RELOADER].close()
        await app[GATEWAY].current.close()

    app.cleanup_ctx.append(gateway_ctx)
    return app


#: Characters of an unmatched request's path kept for its access line.
UNMATCHED_PATH_CHARS = 256


def _recorded(holder: GatewayHolder, handler: Any) -> Any:
    """The catch-all route's handler, its requests recorded as exchanges (``Gateway.record_unmatched``): scans of
    unknown paths show in the access log and the metrics."""
    from .exchange import Exchange
    from .web_handlers import client_ip

    async def recorded(request: web.Request) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        gateway = holder.current
        exchange = Exchange(request_id=request["request_id"], endpoint="unmatched", headers=request.headers,
                            client_ip=client_ip(request, gateway.trusted_proxies), trace_id=request["trace_id"])
        exchange.state["path"] = f"{request.method} {request.path[:UNMATCHED_PATH_CHARS]}"
        await gateway.record_unmatched(exchange, response.status)
        return response

    return recorded


async def start_server(app: web.Application, host: str, port: int, *, reuse_port: bool = False,
                       sock: socket.socket | None = None, metrics_only: bool = False) -> tuple[web.AppRunner, int]:
    """Start serving; returns the runner and the bound port (useful with ``port=0``). A gateway's app serves
    HTTPS when ``server.tls_cert_file`` is set (not the ``metrics_only`` listener of ``metrics_port``: Prometheus
    scrapes it inside the network).

    Handlers are cancelled when their client disconnects (``handler_cancellation``), which is how a
    disconnect cancels the upstream request at once, before the first byte and for non-stream requests too.
    """
    runner = GatewayRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=5)
    await runner.setup()  # starts the Gateway (providers, plugins, their background tasks)
    try:
        tls = None
        holder = app.get(GATEWAY)
        if holder is not None and holder.current.config.server.tls_cert_file and not metrics_only:
            server = holder.current.config.server
            tls = holder.tls = server_context(server.tls_cert_file, server.tls_key_file)  # type: ignore[arg-type]
        if sock is not None:
            site: web.BaseSite = web.SockSite(runner, sock, ssl_context=tls)
        else:
            site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None, backlog=1024, ssl_context=tls)
        await site.start()
    except BaseException:  # the port is taken, say: stop what started, or its tasks keep the process alive
        await runner.cleanup()
        raise
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, bound


#: Young collections between two collections of the middle generation while serving (Python's default: 10).
GC_GEN1_THRESHOLD = 2


def tune_gc(gen0_threshold: int) -> None:
    """Once serving: move everything that exists now (modules, config, plugins) out of the collector's sight,
    and collect the young generation every ``gen0_threshold`` allocations instead of every 700. Requests
    free almost everything by reference counting; at the default threshold the collections that still run
    cost ~50 µs per request under load (measured with ``bench.ab``).

    The middle generation is collected every third young collection (:data:`GC_GEN1_THRESHOLD`) instead of every
    eleventh: with young collections this far apart it would otherwise gather the survivors of ~100,000
    allocations, and under 1,000 live streams its collections paused every stream for 44–96 ms (33–41 ms with
    this setting, at the same CPU per stream; ``gc.callbacks``, three waves each)."""
    if gen0_threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, _, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, GC_GEN1_THRESHOLD, gen2)


async def drain(app: web.Application, grace: float) -> None:
    """Graceful stop: readiness and new requests answer 503, in-flight requests run on for up to ``grace``
    seconds, then live streams end with a final SSE error event and ``[DONE]``."""
    holder = app[GATEWAY]
    holder.draining = True
    current = holder.current
    # After a reload, requests that started on an earlier config still run on its Gateway: they drain too.
    gateways = current.live_gateways()
    log.info("draining", in_flight=current.process_in_flight, gateways=len(gateways), grace_seconds=grace)
    if not await _all_idle(gateways, grace):
        aborted = sum(gateway.abort_live() for gateway in gateways)
        log.warning("drain_grace_expired", aborted=aborted, in_flight=current.process_in_flight)
        await _all_idle(gateways, 5.0)
    log.info("drained")


async def _all_idle(gateways: tuple[Gateway, ...], timeout: float) -> bool:
    """Wait until none of ``gateways`` has a request in flight; False if ``timeout`` passed first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for gateway in gateways:
        if not await gateway.wait_idle(max(0.0, deadline - loop.time())):
            return False
    return True


async def serve(app: web.Application, host: str, port: int, *, reuse_port: bool = False,
                ready_message: bool = True) -> None:
    """Serve until SIGTERM/SIGINT (then drain); SIGHUP reloads the config."""
    runner, bound = await start_server(app, host, port, reuse_port=reuse_port)
    metrics_runner = None
    metrics_port = app[GATEWAY].current.config.observability.metrics_port
    if metrics_port:
        try:
            metrics_runner, _ = await start_server(metrics_app(app), host, metrics_port, reuse_port=reuse_port,
                                                   metrics_only=True)
        except BaseException:
            await runner.cleanup()
            raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_hup() -> None:
        loop.create_task(app[RELOADER].reload())

    for sig, handler in ((signal.SIGINT, stop.set), (signal.SIGTERM, stop.set), (signal.SIGHUP, on_hup)):
        try:
            loop.add_signal_handler(sig, handler)
        except (NotImplementedError, RuntimeError, AttributeError):
            pass
    reloader = app[RELOADER]
    watch_interval = app[GATEWAY].current.config.server.config_watch_interval
    watcher = None
    if watch_interval > 0 and reloader.config_path is not None:
        watcher = loop.create_task(reloader.watch(watch_interval), name="ssegate-config-watch")
    tune_gc(app[GATEWAY].current.config.server.gc_gen0_threshold)
    if ready_message:
        print(f"ssegate listening on {'https' if app[GATEWAY].tls else 'http'}://{host}:{bound}", flush=True)
    try:
        await stop.wait()
        await stop_task(watcher)
        await drain(app, app[GATEWAY].current.config.server.shutdown_grace_seconds)
    finally:
        await stop_task(watcher)
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await runner.cleanup()


def metrics_app(main: web.Application) -> web.Application:
    """A second listener with only ``/metrics`` (the seed's port 9090), sharing the main app's gateway."""
    from .web_handlers import metrics_response

    app = web.Application()
    app[GATEWAY] = main[GATEWAY]

    async def metrics(request: web.Request) -> web.Response:
        return metrics_response(request)

    app.router.add_get("/metrics", metrics)
    return app
