"""Test helpers for ssegate and for plugin authors, and a pytest plugin (``pytest11`` entry point ``ssegate``).

Installed with ssegate (``pip install 'ssegate[testing]'`` brings pytest, pytest-asyncio and openai), the pytest
plugin loads by itself in every pytest run and offers two fixtures, whatever the project's pytest-asyncio mode:

``ssegate_gateway``
    a factory: ``gw = await ssegate_gateway(pipeline=["router", MyPlugin], texts=["Hel", "lo"])`` starts a real
    gateway on 127.0.0.1 with that pipeline in front of a :class:`ScriptedUpstream` answering with that
    :class:`Script`; ``await gw.chat("hi")`` returns the streamed text, ``gw.openai`` is an ``AsyncOpenAI`` client
    to it, ``gw.upstream.requests`` what reached the upstream. Everything is closed after the test.
``ssegate_upstream``
    a bare :class:`ScriptedUpstream` (pass it as ``upstream=`` to share one between gateways).

And helpers that need no server: :func:`make_exchange` builds an :class:`~proxy.Exchange`, :func:`make_chunks`
OpenAI stream events, :func:`feed_chunks` runs ``on_chunk`` of one plugin (or several, in order) over chunks
including the final ``[DONE]``, :func:`run_check_request`, :func:`run_upstream_request` and
:func:`run_on_response` run those phases, :func:`build_pipeline` gives the real :class:`~proxy.pipeline.Pipeline`.

A plugin is named in a ``pipeline`` or ``plugins`` argument as in the config (``"router"``, an entry-point name,
``"pkg.mod:Obj"``, ``{"name": {settings}}``), or as the Python object itself: a class (instantiated with its
``Config`` structured from the settings, so a typo raises :class:`~proxy.config.load.ConfigError`), a module,
a ready instance, or ``(class, {settings})``.

The lower-level pieces used by ssegate's own tests stay available::

    upstream = await ScriptedUpstream.start()
    upstream.script = Script(texts=["Hel", "lo"], chunk_size=7, delay=0.01)
    gateway = await GatewayServer.start(config_for(upstream, pipeline=["router", "audit"]),
                                        plugins={"audit": Audit()})
"""
from __future__ import annotations

import asyncio
import inspect
from types import ModuleType
from typing import Any, AsyncIterator, Iterable, Sequence

import attrs
import orjson
from aiohttp import web

from .config.load import ConfigError, Origins, structure
from .config.schema import Config, PipelineEntry, ProviderConfig, StreamingConfig
from .errors import StopStream
from .exchange import Exchange, Principal, Reply, Route
from .gateway import Gateway
from .pipeline import Pipeline
from .plugin_manager import PluginLoadError, instantiate, entry_problem, load_plugins, new_plugin_manager
from .sse import DONE, Chunk, SSEParser
from .upstream import UpstreamRequest
from .web_app import create_app, start_server

__all__ = [
    # servers
    "Script", "ScriptedUpstream", "GatewayServer", "config_for",
    # the fixtures' objects
    "GatewayFactory", "RunningGateway", "Answer", "AnswerError",
    # without a server
    "make_exchange", "make_chunks", "content_of", "feed_chunks", "StreamOutput", "build_pipeline",
    "run_check_request", "run_upstream_request", "run_on_response",
    "DEFAULT_MODEL", "ConfigError",
]

#: The model name the helpers put in requests unless told otherwise (the scripted upstream serves any).
DEFAULT_MODEL = "gpt-4o-mini"

_INSTALL_HINT = "pip install 'ssegate[testing]'"


def make_chunks(texts: Iterable[str], *, model: str = DEFAULT_MODEL, role: bool = True,
                finish_reason: str | None = "stop", usage: dict[str, int] | None = None,
                done: bool = True) -> list[Chunk]:
    """The events of an OpenAI chat stream carrying ``texts``, as :class:`~proxy.Chunk` objects.

    In order: a role chunk (``role``), one content chunk per text, a chunk with ``finish_reason`` (None: none),
    a usage chunk when ``usage`` is given (then every chunk carries ``"usage": null``, as OpenAI sends with
    ``stream_options.include_usage``) and ``data: [DONE]`` (``done``). The bytes are those of the
    :class:`ScriptedUpstream` (compact JSON, OpenAI's key order).
    """
    base = {"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": 1700000000, "model": model}
    extra: dict[str, Any] = {"usage": None} if usage is not None else {}
    objs: list[dict[str, Any]] = []
    if role:
        objs.append({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "finish_reason": None}], **extra})
    for text in texts:
        objs.append({**base, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}], **extra})
    if finish_reason is not None:
        objs.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish_reason}], **extra})
    if usage is not None:
        objs.append({**base, "choices": [], "usage": usage})
    chunks = [Chunk(b"data: " + orjson.dumps(o)) for o in objs]
    if done:
        chunks.append(Chunk(DONE))
    return chunks


def content_of(chunk: Chunk | dict[str, Any] | Any) -> str:
    """The text a stream chunk (a :class:`~proxy.Chunk` or its JSON) or a non-stream answer body carries.

    ``choices[].delta.content`` (chat chunks), ``choices[].message.content`` (chat answers) or
    ``choices[].text`` (completions), joined over the choices; ``""`` when there is none (``[DONE]``, a role or
    finish chunk, an error).
    """
    obj = chunk.json if isinstance(chunk, Chunk) else chunk
    if not isinstance(obj, dict):
        return ""
    out = []
    for choice in obj.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        part = choice.get("delta") or choice.get("message")
        text = part.get("content") if isinstance(part, dict) else choice.get("text")
        if isinstance(text, str):
            out.append(text)
    return "".join(out)


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

    Records every request (``requests``: parsed bodies; ``raw_requests``: the bytes; ``headers``; ``peers``: the
    connection each chat request came on), counts
    handlers cancelled by a client disconnect (``cancelled``) and completed streams (``completed``).
    """

    def __init__(self) -> None:
        self.script = Script()
        self.requests: list[dict[str, Any]] = []
        self.raw_requests: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        self.times: list[float] = []  # loop time of each request's arrival
        #: The client address (host, port) of each chat request: which connection it came on.
        self.peers: list[tuple[str, int]] = []
        self.cancelled = 0
        self.completed = 0
        self.in_flight = 0
        self.cancel_event = asyncio.Event()
        #: What ``GET /v1/models`` lists (None: it answers 404, as servers without the route do).
        self.model_list: list[str] | None = None
        self.model_list_requests = 0
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
        app.router.add_get("/v1/models", self._models)
        self._runner, self.port = await start_server(app, "127.0.0.1", 0)
        return self

    async def _models(self, request: web.Request) -> web.Response:
        self.model_list_requests += 1
        self.headers.append(dict(request.headers))
        if self.model_list is None:
            return web.json_response({"error": {"message": "not found", "type": "invalid_request_error"}},
                                     status=404)
        return web.json_response({"object": "list", "data": [
            {"id": m, "object": "model", "created": 1700000000, "owned_by": "upstream"} for m in self.model_list]})

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def events(self, body: dict[str, Any]) -> list[bytes]:
        """The raw SSE events (without terminators) this script streams for a request."""
        s = self.script
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return [c.raw for c in make_chunks(s.texts, model=body.get("model", "m"), finish_reason=s.finish_reason,
                                           usage=s.usage if include_usage else None)]

    async def _error(self) -> web.Response:
        s = self.script
        headers = {"Retry-After": s.retry_after} if s.retry_after else None
        body = {"error": {"message": s.error, "type": "server_error", "param": None, "code": "scripted"}}
        return web.json_response(body, status=s.status, headers=headers)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = orjson.loads(raw)
        self.raw_requests.append(raw)
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        self.times.append(asyncio.get_running_loop().time())
        peer = request.transport.get_extra_info("peername") if request.transport is not None else None
        self.peers.append(tuple(peer[:2]) if peer else ("", 0))
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
        raw = await request.read()
        body = orjson.loads(raw)
        self.raw_requests.append(raw)
        self.requests.append(body)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        return web.json_response({"object": "list", "model": body.get("model"), "data": [
            {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(inputs))],
            "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}})


def config_for(*upstreams: "ScriptedUpstream | str", pipeline: list[Any] | None = None,
               keepalive_interval: float = 15.0, **provider_options: Any) -> Config:
    """A Config routing every model to the given upstreams (or base URLs) in order of priority.

    ``pipeline`` keeps only names (strings or :class:`PipelineEntry`); pass plugin objects to
    :meth:`GatewayServer.start` by name, or use the ``ssegate_gateway`` fixture, which takes objects directly.
    """
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


# -- naming plugins in tests ---------------------------------------------------------------------------------

def _plugin_specs(plugins: Any) -> list[Any]:
    """A list is several plugins in pipeline order; anything else, a tuple ``(Plugin, {settings})`` included, is one."""
    return list(plugins) if isinstance(plugins, list) else [plugins]


def _object_name(obj: Any, taken: set[str]) -> str:
    if isinstance(obj, ModuleType):
        base = obj.__name__
    elif inspect.isclass(obj):
        base = f"{obj.__module__}:{obj.__qualname__}"
    else:
        base = f"{type(obj).__module__}:{type(obj).__qualname__}"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}#{n}", n + 1
    return name


def _resolve_pipeline(plugins: Any) -> tuple[tuple[PipelineEntry, ...], dict[str, Any]]:
    """Pipeline entries plus the ready objects to register under their names (see the module docstring)."""
    entries: list[PipelineEntry] = []
    objects: dict[str, Any] = {}
    taken: set[str] = set()
    origins = Origins()
    for index, spec in enumerate(_plugin_specs(plugins)):
        settings = None
        if isinstance(spec, tuple):
            if len(spec) != 2 or not isinstance(spec[1], (dict, type(None))):
                raise TypeError(f"pipeline[{index}]: a tuple names a plugin and its settings: (Plugin, {{...}}), "
                                f"got {spec!r}")
            spec, settings = spec
        if isinstance(spec, PipelineEntry):
            entry = spec
        elif isinstance(spec, str):
            entry = PipelineEntry(spec, settings)
        elif isinstance(spec, dict):
            if len(spec) != 1 or not isinstance(next(iter(spec)), str):
                raise TypeError(f"pipeline[{index}]: a dict names one plugin and its settings, got {spec!r}")
            entry = PipelineEntry(*next(iter(spec.items())))
        else:
            entry = PipelineEntry(_object_name(spec, taken), settings)
            if inspect.isclass(spec) or isinstance(spec, ModuleType):
                try:  # as load_plugins does for the names it resolves: every problem is a PluginLoadError
                    objects[entry.name] = instantiate(index, entry, spec, origins)[0]
                except (LookupError, TypeError, ValueError) as exc:
                    raise PluginLoadError([entry_problem(index, entry, origins, str(exc))]) from exc
            elif settings is not None:
                raise TypeError(f"pipeline[{index}]: {spec!r} is an instance, already configured: "
                                "give settings with its class, (Plugin, {...})")
            else:
                objects[entry.name] = spec
        taken.add(entry.name)
        entries.append(entry)
    return tuple(entries), objects


def build_pipeline(plugins: Any) -> Pipeline:
    """The real :class:`~proxy.pipeline.Pipeline` of these plugins (one, or a list in pipeline order).

    Plugins load exactly as the gateway loads them: a class's settings are structured into its ``Config``
    (a typo raises :class:`~proxy.config.load.ConfigError`), ``requires_hook_api`` is checked, unknown hooks
    and wrappers are refused. Call its phases yourself: ``await build_pipeline(P).authenticate(exchange)``.
    """
    entries, objects = _resolve_pipeline(plugins)
    pm = new_plugin_manager()
    loaded = load_plugins(entries, pm, Origins(), objects)
    return Pipeline(pm, [p.name for p in loaded])


def _as_pipeline(plugins: Any) -> Pipeline:
    return plugins if isinstance(plugins, Pipeline) else build_pipeline(plugins)


# -- exchanges and chunks without a server -------------------------------------------------------------------

def make_exchange(body: str | list[dict[str, Any]] | dict[str, Any] | bytes | None = None, *,
                  endpoint: str = "chat.completions", model: str = DEFAULT_MODEL, stream: bool = True,
                  headers: dict[str, str] | None = None, principal: Principal | None = None,
                  request_id: str = "req-test", **fields: Any) -> Exchange:
    """An :class:`~proxy.Exchange` as the gateway builds it for a request, for calling hooks directly.

    ``body``: a string is the user's message (``prompt`` for ``endpoint="completions"``, ``input`` for
    ``"embeddings"``; None: ``"Hello"``), a list the ``messages``, a dict or bytes the whole request body (then
    ``model`` and ``stream`` are read from it). ``headers`` become the client's (case-insensitive) request headers; other
    keyword arguments set Exchange fields (``client_ip=...``, ``tags=...``).
    """
    from multidict import CIMultiDict, CIMultiDictProxy

    if isinstance(body, (bytes, bytearray)):
        body = orjson.loads(body)
    if not isinstance(body, dict):
        if endpoint == "completions":
            data: dict[str, Any] = {"prompt": "Hello" if body is None else body}
        elif endpoint == "embeddings":
            data = {"input": "Hello" if body is None else body}
        else:
            messages = [{"role": "user", "content": "Hello" if body is None else body}] \
                if not isinstance(body, list) else body
            data = {"messages": messages}
        body = {"model": model, **data}
        if stream and endpoint != "embeddings":
            body["stream"] = True
    exchange = Exchange(request_id=request_id, endpoint=endpoint, body=orjson.dumps(body),
                        headers=CIMultiDictProxy(CIMultiDict(headers or {})), model=body.get("model"),
                        stream=bool(body.get("stream")),
                        include_usage=bool((body.get("stream_options") or {}).get("include_usage")),
                        principal=principal, **fields)
    return exchange


def _chunk(item: Any) -> Chunk:
    if isinstance(item, Chunk):
        return item
    if isinstance(item, str):
        return make_chunks([item], role=False, finish_reason=None, done=False)[0]
    if isinstance(item, (bytes, bytearray)):
        return Chunk(bytes(item))
    if isinstance(item, dict):
        return Chunk.from_json(item)
    raise TypeError(f"feed_chunks: cannot make a chunk of {item!r} (give str, dict, bytes or Chunk)")


class StreamOutput(list):  # type: ignore[type-arg]
    """What :func:`feed_chunks` let through: the output :class:`~proxy.Chunk` objects, in order, plus views.

    ``texts``: the content of each output chunk except ``[DONE]`` (``""`` for role/finish chunks), so chunk
    boundaries are visible; ``text``: all of it joined; ``done``: ``[DONE]`` came out last; ``stopped``: the
    :class:`~proxy.StopStream` a plugin raised (then the gateway would add a finish chunk and ``[DONE]``), or
    None; ``exchange``: the exchange the hooks saw.
    """

    stopped: StopStream | None = None
    exchange: Exchange

    @property
    def texts(self) -> list[str]:
        return [content_of(c) for c in self if not c.is_done]

    @property
    def text(self) -> str:
        return "".join(self.texts)

    @property
    def done(self) -> bool:
        return bool(self) and self[-1].is_done


def feed_chunks(plugins: Any, items: Sequence[str | dict[str, Any] | bytes | Chunk],
                exchange: Exchange | None = None, *, done: bool = True) -> StreamOutput:
    """Run ``on_chunk`` of one plugin (or a list of plugins, in pipeline order) over a stream, without a server.

    ``items`` are the upstream events in order: a string becomes a content chunk carrying it (no role or
    finish chunk is added; use :func:`make_chunks` for a complete stream), a dict a chunk of that JSON, bytes a
    raw event. ``data: [DONE]`` is fed last unless ``done=False`` or the items end with it, so hold-back
    plugins flush. Each plugin sees what the previous one returned, exactly as in the gateway (the same
    chain). A :class:`~proxy.StopStream` stops the feeding and is kept in ``.stopped``; any other exception
    propagates. ``exchange`` defaults to ``make_exchange()`` (a streaming chat request). ``plugins`` may also
    be a :class:`~proxy.pipeline.Pipeline`, whose plugin instances then keep their state across calls.
    """
    pipeline = _as_pipeline(plugins)
    exchange = exchange if exchange is not None else make_exchange()
    chunks = [_chunk(i) for i in items]
    if done and not (chunks and chunks[-1].is_done):
        chunks.append(Chunk(DONE))
    out = StreamOutput()
    out.exchange = exchange
    chain = pipeline.on_chunk
    for chunk in chunks:
        try:
            released = chain(exchange, chunk) if chain is not None else [chunk]
        except StopStream as stop:
            out.stopped = stop
            break
        out.extend(released)
        exchange.chunks_sent += len(released)
    return out


async def run_check_request(plugins: Any, exchange: Exchange | None = None) -> Reply | None:
    """Run ``check_request`` of the plugins in order, as the gateway does: the first :class:`~proxy.Reply`
    returned wins (later plugins do not run) and is returned; None means admitted. A
    :class:`~proxy.GatewayError` raised by a plugin propagates; any other exception becomes a 500
    ``PluginError``, as in the gateway. ``exchange`` defaults to ``make_exchange()``."""
    exchange = exchange if exchange is not None else make_exchange()
    return await _as_pipeline(plugins).check_request(exchange)


async def run_upstream_request(plugins: Any, exchange: Exchange | None = None, *,
                               route: Route | None = None) -> UpstreamRequest:
    """Run ``upstream_request`` of the plugins in order and return the request they edited.

    ``request.json`` is the body that would be sent (the client's, unless a plugin changed it),
    ``request.headers`` the headers plugins added. ``route`` defaults to ``Route("scripted", exchange.model)``.
    """
    exchange = exchange if exchange is not None else make_exchange()
    path = {"completions": "/completions", "embeddings": "/embeddings"}.get(exchange.endpoint,
                                                                              "/chat/completions")
    request = UpstreamRequest(exchange, route or Route("scripted", exchange.model or DEFAULT_MODEL), path)
    await _as_pipeline(plugins).upstream_request(exchange, request)
    return request


async def run_on_response(plugins: Any, body: str | dict[str, Any], exchange: Exchange | None = None) -> Any:
    """Run ``on_response`` of the plugins over a non-stream answer and return the body the client would get.

    ``body``: a dict is the upstream's JSON answer; a string becomes a ``chat.completion`` answer with that
    assistant message. ``exchange`` defaults to a non-stream ``make_exchange(stream=False)``. A
    :class:`~proxy.StopStream` or :class:`~proxy.GatewayError` raised by a plugin propagates.
    """
    exchange = exchange if exchange is not None else make_exchange(stream=False)
    if isinstance(body, str):
        body = {"id": "chatcmpl-scripted", "object": "chat.completion", "created": 1700000000,
                "model": exchange.model, "choices": [{"index": 0, "finish_reason": "stop",
                                                      "message": {"role": "assistant", "content": body}}]}
    return await _as_pipeline(plugins).on_response(exchange, body)


# -- a running gateway for a test ----------------------------------------------------------------------------

class AnswerError(Exception):
    """The gateway answered a :meth:`RunningGateway.chat` with an HTTP error: ``status``, ``body`` (the
    OpenAI-format JSON), ``code`` and ``message`` of its ``error`` object, ``headers``."""

    def __init__(self, status: int, body: Any, headers: dict[str, str]) -> None:
        error = body.get("error") if isinstance(body, dict) else None
        error = error if isinstance(error, dict) else {}
        self.status, self.body, self.headers = status, body, headers
        self.code: str | None = error.get("code")
        self.message: str = error.get("message") or str(body)
        super().__init__(f"HTTP {status}: {self.message} (code {self.code!r})")


class Answer(str):
    """The text of a gateway's answer (a ``str``: compare it, search it), with what else came back.

    ``status``, ``headers``; ``finish_reason`` (of choice 0); ``events``: the parsed data events of a stream
    (JSON objects, ``"[DONE]"`` as that string; comments left out), ``chunks``: the content pieces as streamed;
    ``body``: the JSON of a non-stream answer; ``error``: the ``error`` object of an SSE error event ending a
    stream, else None.
    """

    status: int
    headers: dict[str, str]
    finish_reason: str | None
    events: list[Any]
    chunks: list[str]
    body: Any
    error: dict[str, Any] | None


class RunningGateway:
    """A gateway the ``ssegate_gateway`` fixture started, and the scripted upstream behind it.

    ``url``/``base_url`` (``.../v1``), ``upstream`` (a :class:`ScriptedUpstream`: change ``upstream.script``,
    read ``upstream.requests``), ``server`` (the :class:`GatewayServer`), ``gateway`` (the live
    :class:`~proxy.gateway.Gateway`), :meth:`plugin`, :meth:`chat` and :attr:`openai`.
    """

    def __init__(self, server: GatewayServer, upstream: "ScriptedUpstream") -> None:
        self.server, self.upstream = server, upstream
        self._openai: Any = None

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def gateway(self) -> Gateway:
        return self.server.current

    def plugin(self, name_or_class: Any) -> Any:
        """The plugin instance registered under this pipeline name, or the (first) instance of this class."""
        for loaded in self.gateway.plugins:
            if loaded.name == name_or_class or (inspect.isclass(name_or_class)
                                                and isinstance(loaded.obj, name_or_class)):
                return loaded.obj
        raise KeyError(name_or_class)

    @property
    def openai(self) -> Any:
        """An ``openai.AsyncOpenAI`` client to this gateway (``max_retries=0``), closed after the test."""
        if self._openai is None:
            try:
                import openai
            except ImportError:
                raise RuntimeError(f"RunningGateway.openai needs the openai package: {_INSTALL_HINT}") from None
            self._openai = openai.AsyncOpenAI(base_url=self.base_url, api_key="test-key", max_retries=0)
        return self._openai

    async def chat(self, messages: str | list[dict[str, Any]], *, stream: bool = True, model: str = DEFAULT_MODEL,
                   headers: dict[str, str] | None = None, **params: Any) -> Answer:
        """POST ``/v1/chat/completions`` and return the answer's text as an :class:`Answer`.

        ``messages``: a string is one user message. ``stream`` defaults to True; other keyword arguments go into
        the request body (``max_tokens=5``, ``stream_options={...}``). An HTTP error status raises
        :class:`AnswerError`; an SSE error event ending a stream is kept in ``answer.error``.
        """
        import aiohttp

        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        body = {"model": model, "messages": messages, **params}
        if stream:
            body["stream"] = True
        async with aiohttp.ClientSession() as session:
            async with session.post(self.base_url + "/chat/completions", data=orjson.dumps(body),
                                    headers={"Content-Type": "application/json", **(headers or {})}) as resp:
                raw = await resp.read()
                resp_headers = dict(resp.headers)
                status = resp.status
        if status >= 400:
            try:
                err_body: Any = orjson.loads(raw)
            except orjson.JSONDecodeError:
                err_body = raw.decode("utf-8", "replace")
            raise AnswerError(status, err_body, resp_headers)
        events: list[Any] = []
        pieces: list[str] = []
        finish: str | None = None
        error: dict[str, Any] | None = None
        json_body: Any = None
        if resp_headers.get("Content-Type", "").startswith("text/event-stream"):
            for ev in SSEParser().feed(raw + b"\n\n"):
                chunk = Chunk(ev)
                if chunk.is_comment:
                    continue
                if chunk.is_done:
                    events.append("[DONE]")
                    continue
                obj = chunk.json
                events.append(obj)
                if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
                    error = obj["error"]
                pieces.append(content_of(obj))
                for choice in (obj.get("choices") or ()) if isinstance(obj, dict) else ():
                    if isinstance(choice, dict) and choice.get("index", 0) == 0 and choice.get("finish_reason"):
                        finish = choice["finish_reason"]
            text = "".join(pieces)
        else:
            json_body = orjson.loads(raw)
            text = content_of(json_body)
            choices = json_body.get("choices") if isinstance(json_body, dict) else None
            finish = choices[0].get("finish_reason") if choices else None
        answer = Answer(text)
        answer.status, answer.headers, answer.finish_reason = status, resp_headers, finish
        answer.events, answer.chunks, answer.body, answer.error = events, [p for p in pieces if p], json_body, error
        return answer

    async def close(self) -> None:
        """Close the SDK client and the gateway (the fixture does it after the test)."""
        if self._openai is not None:
            await self._openai.close()
            self._openai = None
        await self.server.close()


class GatewayFactory:
    """The ``ssegate_gateway`` fixture: call it to start a gateway; all are closed when the test ends."""

    def __init__(self) -> None:
        self._gateways: list[RunningGateway] = []
        self._upstreams: list[ScriptedUpstream] = []

    async def __call__(self, pipeline: Any = ("router",), *, script: Script | None = None,
                       upstream: "ScriptedUpstream | None" = None, config: dict[str, Any] | None = None,
                       **script_fields: Any) -> RunningGateway:
        """Start a gateway with ``pipeline`` (in config order; see the module docstring for how to name
        plugins; give ``"router"`` or your own ``select_route`` plugin) in front of a scripted upstream.

        The upstream answers with ``script``, or with a :class:`Script` made of ``script_fields``
        (``texts=[...]``, ``delay=``, ``chunk_size=``, ``cut_after=``, ``status=``, ...). ``upstream``: use this
        :class:`ScriptedUpstream` instead of starting one. ``config``: more top-level config sections as in the
        YAML file (``{"streaming": {"keepalive_interval": 0.05}}``), checked by the real loader. A plugin config
        error raises :class:`~proxy.config.load.ConfigError` naming the key.
        """
        if script is not None and script_fields:
            raise TypeError("give either script=Script(...) or its fields (texts=..., delay=...), not both")
        entries, objects = _resolve_pipeline(list(pipeline) if isinstance(pipeline, tuple) else pipeline)
        if upstream is None:
            upstream = await ScriptedUpstream.start()
            self._upstreams.append(upstream)
        if script is not None or script_fields:
            upstream.script = script if script is not None else Script(**script_fields)
        data = {"providers": [{"name": "scripted", "type": "openai", "base_url": upstream.base_url}],
                **(config or {})}
        cfg = attrs.evolve(structure(data, Config, Origins()), pipeline=entries)
        server = await GatewayServer.start(cfg, plugins=objects)
        gw = RunningGateway(server, upstream)
        self._gateways.append(gw)
        return gw

    async def close(self) -> None:
        """Close every gateway, then every upstream this factory started."""
        for gw in reversed(self._gateways):
            await gw.close()
        for up in self._upstreams:
            await up.close()
        self._gateways.clear()
        self._upstreams.clear()


# -- the pytest plugin ---------------------------------------------------------------------------------------

try:
    import pytest as _pytest
except ImportError:  # importing proxy.testing (bench, embedding) must not need pytest
    _pytest = None  # type: ignore[assignment]

if _pytest is not None:
    try:
        import pytest_asyncio as _pytest_asyncio
    except ImportError:
        _pytest_asyncio = None  # type: ignore[assignment]

    if _pytest_asyncio is not None:
        @_pytest_asyncio.fixture
        async def ssegate_upstream() -> AsyncIterator[ScriptedUpstream]:
            """A :class:`ScriptedUpstream` on 127.0.0.1, closed after the test."""
            up = await ScriptedUpstream.start()
            try:
                yield up
            finally:
                await up.close()

        @_pytest_asyncio.fixture
        async def ssegate_gateway() -> AsyncIterator[GatewayFactory]:
            """``await ssegate_gateway(pipeline=[...], texts=[...])`` starts a gateway in front of a scripted
            upstream and returns a :class:`RunningGateway`; everything is closed after the test."""
            factory = GatewayFactory()
            try:
                yield factory
            finally:
                await factory.close()
    else:
        @_pytest.fixture
        def ssegate_upstream() -> None:
            """Needs pytest-asyncio."""
            _pytest.fail(f"the ssegate_upstream fixture needs pytest-asyncio: {_INSTALL_HINT}", pytrace=False)

        @_pytest.fixture
        def ssegate_gateway() -> None:
            """Needs pytest-asyncio."""
            _pytest.fail(f"the ssegate_gateway fixture needs pytest-asyncio: {_INSTALL_HINT}", pytrace=False)
