"""The simulator over HTTP (``ssegate simulate``): an OpenAI-compatible aiohttp application.

Routes: ``GET /v1/models``, ``GET /v1/models/{model}``, ``POST /v1/chat/completions``,
``POST /v1/completions``, ``POST /v1/embeddings`` and ``GET /health``. Errors are OpenAI-format JSON.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Any, AsyncIterator, Awaitable, Callable

import orjson
from aiohttp import web

from .config.schema import SimulationConfig
from .errors import GatewayError
from .simulator import Simulator

__all__ = [
    "build_simulator_app",
    "run_simulator",
    "serve_simulator",
    "SIMULATOR_KEY",
    "STATS_KEY",
    "SimulatorStats",
]

log = logging.getLogger(__name__)

_SSE_END = b"\n\n"
_JSON = "application/json"


class SimulatorStats:
    """Live counters of a simulator app."""

    __slots__ = ("active_streams", "disconnects")

    def __init__(self) -> None:
        self.active_streams = 0
        self.disconnects = 0


SIMULATOR_KEY = web.AppKey("ssegate_simulator", Simulator)
STATS_KEY = web.AppKey("ssegate_simulator_stats", SimulatorStats)


def _json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type=_JSON, headers=headers)


def _error_response(error: GatewayError) -> web.Response:
    return web.Response(body=error.to_json(), status=error.status, content_type=_JSON, headers=error.headers)


@web.middleware
async def _error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as exc:
        return _error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            message = f"Invalid URL ({request.method} {request.path})"
        elif exc.status == 405:
            message = f"Method {request.method} not allowed for {request.path}"
        else:
            message = exc.text or exc.reason
        error = GatewayError(exc.status, message)
        allow = exc.headers.get("Allow")
        if allow:
            error.headers["Allow"] = allow
        return _error_response(error)
    except Exception:
        log.exception("simulator: unexpected error on %s %s", request.method, request.path)
        return _error_response(GatewayError(500, "The simulator had an internal error.", type="server_error"))


async def _read_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise GatewayError(
            400,
            "We could not parse the JSON body of your request. The body must be a valid JSON object.",
        ) from None
    if not isinstance(body, dict):
        raise GatewayError(400, "The request body must be a JSON object.")
    return body


async def _stream(request: web.Request, events: AsyncIterator[bytes]) -> web.StreamResponse:
    """Write ``events`` as SSE, one write per event; stop quietly when the client goes away."""
    stats = request.app[STATS_KEY]
    try:
        # The first event is produced before the headers: a bad request still gets a proper error status.
        first = await events.__anext__()
    except BaseException:
        await events.aclose()  # type: ignore[attr-defined]
        raise
    resp = web.StreamResponse(status=200, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    resp.content_type = "text/event-stream"
    stats.active_streams += 1
    try:
        await resp.prepare(request)
        await resp.write(first + _SSE_END)
        async for event in events:
            await resp.write(event + _SSE_END)
    except ConnectionError:
        # Client disconnected (aiohttp raises ClientConnectionResetError, a ConnectionResetError).
        stats.disconnects += 1
        return resp
    finally:
        stats.active_streams -= 1
        await events.aclose()  # type: ignore[attr-defined]
    try:
        await resp.write_eof()
    except ConnectionError:
        stats.disconnects += 1
    return resp


async def _models(request: web.Request) -> web.StreamResponse:
    return web.Response(body=request.app[_MODELS_JSON_KEY], content_type=_JSON)


async def _model(request: web.Request) -> web.StreamResponse:
    return _json_response(request.app[SIMULATOR_KEY].model(request.match_info["model"]))


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIMULATOR_KEY]
    body = await _read_body(request)
    sim.check(body, "chat")
    if body.get("stream"):
        return await _stream(request, sim.chat_stream(body))
    return _json_response(await sim.chat_completion(body))


async def _completions(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIMULATOR_KEY]
    body = await _read_body(request)
    sim.check(body, "completions")
    if body.get("stream"):
        return await _stream(request, sim.completion_stream(body))
    return _json_response(await sim.completion(body))


async def _embeddings(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIMULATOR_KEY]
    body = await _read_body(request)
    sim.check(body, "embeddings")
    return _json_response(sim.embeddings(body))


_HEALTH = orjson.dumps({"status": "healthy"})


async def _health(request: web.Request) -> web.StreamResponse:
    return web.Response(body=_HEALTH, content_type=_JSON)


_MODELS_JSON_KEY = web.AppKey("ssegate_simulator_models_json", bytes)


def build_simulator_app(config: SimulationConfig | None = None) -> web.Application:
    """The simulator's aiohttp application (the :class:`Simulator` is at ``app[SIMULATOR_KEY]``)."""
    sim = Simulator(config or SimulationConfig())
    app = web.Application(middlewares=[_error_middleware], client_max_size=64 * 1024 * 1024)
    app[SIMULATOR_KEY] = sim
    app[STATS_KEY] = SimulatorStats()
    app[_MODELS_JSON_KEY] = orjson.dumps({"object": "list", "data": sim.models()})
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/models/{model:.+}", _model)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_get("/health", _health)
    return app


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


async def run_simulator(host: str, port: int, config: SimulationConfig | None = None) -> None:
    """Serve the simulator until cancelled, SIGINT or SIGTERM.

    Prints ``ssegate simulator listening on http://HOST:PORT`` (the real port when ``port`` is 0) to stdout
    once bound. Runs on whatever loop is running; :func:`serve_simulator` picks uvloop when available.
    """
    app = build_simulator_app(config)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = port
        for address in runner.addresses:
            if isinstance(address, tuple) and len(address) >= 2:
                bound_port = address[1]
                break
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError, ValueError):
                continue  # Windows, or not the main thread: rely on cancellation
            installed.append(sig)
        print(f"ssegate simulator listening on http://{_url_host(host)}:{bound_port}", flush=True)
        await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await runner.cleanup()


def serve_simulator(host: str, port: int, config: SimulationConfig | None = None) -> None:
    """Blocking entry point (for the CLI): :func:`run_simulator` on uvloop when importable."""
    coro = run_simulator(host, port, config)
    try:
        try:
            import uvloop
        except ImportError:
            asyncio.run(coro)
        else:
            if sys.version_info >= (3, 11):
                with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                    runner.run(coro)
            else:  # pragma: no cover
                uvloop.install()
                asyncio.run(coro)
    except KeyboardInterrupt:  # pragma: no cover - SIGINT is normally handled inside run_simulator
        pass
