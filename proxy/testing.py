"""Test helpers for ssegate and for plugin authors: a scripted OpenAI-compatible upstream on a real socket,
and a gateway started on 127.0.0.1 in front of it.

    upstream = await ScriptedUpstream.start()
    upstream.script = Script(texts=["Hel", "lo"], chunk_size=7, delay=0.01)
    gateway = await GatewayServer.start(config_for(upstream, pipeline=["router", MyPlugin]))
"""
from __future__ import annotations

import asyncio
from typing import Any

import attrs
import orjson
from aiohttp import web

from .config.schema import Config, PipelineEntry, ProviderConfig, StreamingConfig
from .gateway import Gateway
from .web_app import create_app, start_server

__all__ = ["Script", "ScriptedUpstream", "GatewayServer", "config_for"]


@attrs.define
class Script:
    """What the scripted upstream answers next (to every request until changed).

    ``texts``: content of each streamed chunk; ``chunk_size``: split the SSE bytes into TCP writes of this many
    bytes (None: one write per event); ``delay``: seconds between events; ``first_delay``: seconds before the
    first byte (headers included); ``status``/``error``: answer with this HTTP status and OpenAI error;
    ``cut_after``: drop the connection after this many content events (no ``[DONE]``); ``hang_after``: stop
    sending after this many content events but keep the connection open; ``crlf``: use ``\\r\\n`` line ends;
    ``error_event_after``: send ``data: {"error": ...}`` after this many content events (-1: before the
    role chunk, as the very first event).
    """

    texts: list[str] = attrs.field(factory=lambda: ["Hello", ", ", "world", "!"])
    chunk_size: int | None = None
    delay: float = 0.0
    first_delay: float = 0.0
    status: int = 200
    fail_times: int | None = None
    error: str = "scripted failure"
    retry_after: str | None = None
    cut_after: int | None = None
    hang_after: int | None = None
    crlf: bool = False
    error_event_after: int | None = None
    finish_reason: str = "stop"
    usage: dict[str, int] = attrs.field(factory=lambda: {"prompt_tokens": 7, "completion_tokens": 4,
                                                           "total_tokens": 11})


class ScriptedUpstream:
    """An OpenAI-compatible upstream server on 127.0.0.1 whose answers a test scripts.

    Records every request (``requests``: parsed bodies; ``headers``), counts handlers cancelled by a client
    disconnect (``cancelled``) and completed streams (``completed``).
    """

    def __init__(self) -> None:
        self.script = Script()
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.times: list[float] = []  # loop time of each request's arrival
        self.cancelled = 0
        self.completed = 0
        self.in_flight = 0
        self.cancel_event = asyncio.Event()
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @classmethod
    async def start(cls, script: Script | None = None) -> "ScriptedUpstream":
        self = cls()
        if script is not None:
            self.script = script
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        self._runner, self.port = await start_server(app, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def events(self, body: dict[str, Any]) -> list[bytes]:
        """The raw SSE events (without terminators) this script streams for a request."""
        s = self.script
        base = {"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": 1700000000,
                "model": body.get("model", "m")}
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        extra = {"usage": None} if include_usage else {}
        out = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "finish_reason": None}], **extra}]
        for text in s.texts:
            out.append({**base, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
                        **extra})
        out.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": s.finish_reason}], **extra})
        if include_usage:
            out.append({**base, "choices": [], "usage": s.usage})
        return [b"data: " + orjson.dumps(o) for o in out] + [b"data: [DONE]"]

    async def _error(self) -> web.Response:
        s = self.script
        headers = {"Retry-After": s.retry_after} if s.retry_after else None
        body = {"error": {"message": s.error, "type": "server_error", "param": None, "code": "scripted"}}
        return web.json_response(body, status=s.status, headers=headers)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        self.times.append(asyncio.get_running_loop().time())
        s = self.script
        self.in_flight += 1
        try:
            if s.first_delay:
                await asyncio.sleep(s.first_delay)
            if s.status >= 400 and (s.fail_times is None or len(self.requests) <= s.fail_times):
                return await self._error()
            if not body.get("stream"):
                text = "".join(s.texts)
                self.completed += 1
                return web.json_response({
                    "id": "chatcmpl-scripted", "object": "chat.completion", "created": 1700000000,
                    "model": body.get("model"), "choices": [{"index": 0, "finish_reason": s.finish_reason,
                                                            "message": {"role": "assistant", "content": text}}],
                    "usage": s.usage})
            return await self._stream(request, body)
        except asyncio.CancelledError:
            self.cancelled += 1
            self.cancel_event.set()
            raise
        finally:
            self.in_flight -= 1

    async def _stream(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        s = self.script
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        nl = b"\r\n" if s.crlf else b"\n"
        events = self.events(body)
        for i, ev in enumerate(events):
            content_index = i - 1  # event 0 is the role chunk
            if s.cut_after is not None and content_index == s.cut_after:
                request.transport.close()  # type: ignore[union-attr]
                return resp
            if s.hang_after is not None and content_index == s.hang_after:
                await asyncio.sleep(3600)
            if s.error_event_after is not None and content_index == s.error_event_after:
                err = {"error": {"message": s.error, "type": "server_error", "param": None, "code": "scripted"}}
                await resp.write(b"data: " + orjson.dumps(err) + nl + nl)
                return resp
            data = ev.replace(b"\n", nl) + nl + nl
            if s.chunk_size:
                for j in range(0, len(data), s.chunk_size):
                    await resp.write(data[j:j + s.chunk_size])
                    await asyncio.sleep(0)
            else:
                await resp.write(data)
            if s.delay and i < len(events) - 1:
                await asyncio.sleep(s.delay)
        self.completed += 1
        await resp.write_eof()
        return resp

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        return web.json_response({"object": "list", "model": body.get("model"), "data": [
            {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(inputs))],
            "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}})


def config_for(*upstreams: "ScriptedUpstream | str", pipeline: list[Any] | None = None,
               keepalive_interval: float = 15.0, **provider_options: Any) -> Config:
    """A Config routing every model to the given upstreams (or base URLs) in order of priority."""
    providers = []
    for i, up in enumerate(upstreams):
        url = up.base_url if isinstance(up, ScriptedUpstream) else up
        providers.append(ProviderConfig(name=f"up{i}", type="openai", base_url=url, priority=i + 1,
                                        **provider_options))
    entries = tuple(e if isinstance(e, PipelineEntry) else PipelineEntry(e) for e in (pipeline or ["router"])
                    if isinstance(e, (str, PipelineEntry)))
    return Config(providers=tuple(providers), pipeline=entries,
                  streaming=StreamingConfig(keepalive_interval=keepalive_interval))


class GatewayServer:
    """A Gateway serving on 127.0.0.1 (a free port) with the same runner settings as ``ssegate serve``."""

    def __init__(self, gateway: Gateway, runner: web.AppRunner, port: int) -> None:
        self.gateway, self.runner, self.port = gateway, runner, port
        self.app: web.Application | None = None

    @property
    def current(self) -> Gateway:
        """The Gateway serving new requests now (changes on reload)."""
        from .app_keys import GATEWAY

        return self.app[GATEWAY].current if self.app is not None else self.gateway

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @classmethod
    async def start(cls, config: Config, plugins: dict[str, Any] | None = None,
                    config_path: str | None = None) -> "GatewayServer":
        """Start a gateway; ``plugins`` maps pipeline names to ready plugin objects (they are not imported);
        ``config_path`` is the file a reload reads."""
        gateway = Gateway(config, plugin_objects=plugins)
        app = create_app(gateway, config_path)
        runner, port = await start_server(app, "127.0.0.1", 0)
        server = cls(gateway, runner, port)
        server.app = app
        return server

    async def close(self) -> None:
        await self.runner.cleanup()
