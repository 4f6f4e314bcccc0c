"""The Gateway: one loaded config (providers, plugins, pipeline) and the walk of one request through it.

A Gateway is immutable once started; a config reload builds a new one and swaps it in, so requests in flight
finish on the Gateway they started with.
"""
from __future__ import annotations

import asyncio
import time
from fnmatch import fnmatchcase
from ipaddress import ip_network
from typing import Any, Awaitable, Callable

import orjson
import structlog
from aiohttp import web

from .config.load import ConfigError, Origins
from .config.schema import Config, PipelineEntry
from .errors import GatewayError, StopStream
from .exchange import Exchange, Outcome, Route
from .openai_format import stopped_answer
from .pipeline import Pipeline, PluginError
from .plugin_manager import load_plugins, new_plugin_manager
from .providers import create_provider
from .forwarding import Forwarder
from .metrics import Registry
from .relay import ClientStream, answer_body, error_response, json_response, send_reply
from .redis_url import check_redis_url, redis_client
from .tls import tls_problem
from .upstream import Provider
from .upstream_sessions import SharedSessions
from .watchdog import Watchdog
from .tokens import estimate_prompt_tokens
from .validation import (
    anthropic_count_tokens_body, model_body, models_body, translate_anthropic_ingress, validate,
)

__all__ = ["Gateway"]

log = structlog.get_logger("ssegate.gateway")

#: A request body from this size on has its parsed tree released once the request is routed, when nothing
#: ahead needs it (:meth:`Gateway._parse_not_needed`). A long conversation's tree is several times the size of
#: its bytes; kept, it would stay alive until the answer ends (a whole stream) and crowd the CPU cache.
RELEASE_PARSED_FROM = 8192

#: The ``process_state`` key of the providers' HTTP sessions, kept across reloads (:mod:`proxy.upstream_sessions`).
_SESSIONS = "ssegate.upstream_sessions"
#: The ``process_state`` key of the set of live Gateways (see :meth:`Gateway.live_gateways`).
_LIVE_GATEWAYS = "ssegate.live_gateways"


class Gateway:
    def __init__(self, config: Config, origins: Origins | None = None,
                 plugin_objects: dict[str, Any] | None = None, registry: Registry | None = None,
                 process_state: dict[str, Any] | None = None) -> None:
        self.config = config
        self.providers: dict[str, Provider] = {p.name: create_provider(p) for p in config.providers}
        self.plugin_manager = new_plugin_manager()
        self.plugins = load_plugins(_with_builtins(config), self.plugin_manager, origins, plugin_objects)
        #: Prometheus registry of the process (a reload passes it on, so counters survive).
        self.registry = registry if registry is not None else Registry()
        #: State that outlives config reloads (handed from each Gateway to its successor), keyed by plugin:
        #: e.g. the memory rate-limit buckets, so a reload does not hand every caller a fresh burst.
        self.process_state: dict[str, Any] = process_state if process_state is not None else {}
        #: Called before each /metrics scrape (plugins hand over accumulated values there).
        self.scrape_callbacks: list[Callable[[], None]] = []
        self.active_streams = 0
        self.started_at = time.time()
        self.trusted_proxies = _check_settings(config, self.plugins, origins or Origins())
        self.pipeline = Pipeline(self.plugin_manager, [p.name for p in self.plugins])
        s = config.streaming
        intervals = [s.keepalive_interval] if s.keepalive else []
        for p in config.providers:
            intervals += [t for t in (p.first_token_timeout, p.idle_timeout, p.timeout) if t]
        self.watchdog = Watchdog(tick=min(1.0, max(0.005, min(intervals, default=1.0) / 4)))
        self._redis: Any = None
        self.in_flight = 0
        self._idle: asyncio.Event | None = None
        self._finishing: set[asyncio.Task[None]] = set()
        self._discovery: asyncio.Task[None] | None = None  # the upstreams' model lists being asked for
        self.forwarder = Forwarder(self)
        self.breakers = self.forwarder.breakers
        self.body_timeout = config.server.request_body_timeout

    # -- lifecycle ----------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the provider pools, start the watchdog and the plugins. On failure, what was opened is closed
        again (and only plugins that started are shut down) before the error propagates."""
        self.forwarder.loop = asyncio.get_running_loop()
        try:
            sessions = self.process_state.setdefault(_SESSIONS, SharedSessions())
            for provider in self.providers.values():
                await provider.start(sessions)
            self.watchdog.start()
            await self.pipeline.register_metrics(self.registry)
            await self.pipeline.startup(self)
        except BaseException:
            await self.close()
            raise
        self.process_state.setdefault(_LIVE_GATEWAYS, set()).add(self)
        self.forwarder.hand_on()

    async def close(self) -> None:
        self.process_state.get(_LIVE_GATEWAYS, set()).discard(self)
        if self._discovery is not None:
            self._discovery.cancel()
        if self._finishing:  # exchange_done walks that outlived their (cancelled) handlers
            await asyncio.wait(set(self._finishing), timeout=10)
        await self.pipeline.shutdown(self)
        await self.watchdog.stop()
        for provider in self.providers.values():
            await provider.close()
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    @property
    def redis(self) -> Any:
        """The process's shared ``redis.asyncio.Redis`` client (created on first use from ``redis.url``).

        Raises GatewayError 500 when no ``redis.url`` is configured: a plugin with a Redis backend should
        check ``gateway.config.redis.url`` in ``startup`` and refuse to start without it.
        """
        if self._redis is None:
            cfg = self.config.redis
            if not cfg.url:
                raise GatewayError(500, "no redis.url configured", code="redis_not_configured")
            self._redis = redis_client(cfg.url, max_connections=cfg.max_connections,
                                       socket_timeout=cfg.socket_timeout, connect_timeout=cfg.connect_timeout)
        return self._redis

    def plugin_config(self, name: str) -> Any:
        for plugin in self.plugins:
            if plugin.name == name:
                return plugin.config
        raise KeyError(name)

    def models(self) -> list[str]:
        seen: dict[str, None] = {}
        for provider in self.providers.values():
            if provider.config.enabled:
                for model in provider.list_models():
                    seen.setdefault(model, None)
        return list(seen)

    async def discover_models(self) -> None:
        """Ask the upstreams whose ``models`` have a pattern for their own model lists, those due
        (``discover_models_ttl``), all at once; concurrent callers share one round. A failure is logged and the
        provider keeps the list it had (it is asked again after the TTL)."""
        if self._discovery is None or self._discovery.done():
            now = asyncio.get_running_loop().time()
            due = [p for p in self.providers.values() if p.wants_discovery() and p.discovered_until <= now]
            if not due:
                return
            self._discovery = asyncio.get_running_loop().create_task(self._discover(due, now))
        await asyncio.shield(self._discovery)

    @staticmethod
    async def _discover(providers: list[Provider], now: float) -> None:
        results = await asyncio.gather(*(p.discover_models() for p in providers), return_exceptions=True)
        for provider, result in zip(providers, results):
            provider.discovered_until = now + provider.config.discover_models_ttl
            if isinstance(result, BaseException):
                log.warning("models_discovery_failed", provider=provider.name,
                            error=f"{type(result).__name__}: {result}", kept=len(provider.discovered))
            elif result is not None:
                provider.set_discovered(result)

    # -- draining (reload, shutdown) ------------------------------------------------------------------------
    def live_gateways(self) -> tuple["Gateway", ...]:
        """Every started, not yet closed Gateway of the process: this one, and after a reload the ones before it
        that still finish the requests they took (what the process serves, for gauges and the drain)."""
        live = self.process_state.get(_LIVE_GATEWAYS)
        return tuple(live) if live else (self,)

    @property
    def process_in_flight(self) -> int:
        """Requests in flight in the process, on this Gateway and on those a reload is retiring."""
        return sum(g.in_flight for g in self.live_gateways())

    @property
    def process_active_streams(self) -> int:
        """Streams being relayed in the process, on this Gateway and on those a reload is retiring."""
        return sum(g.active_streams for g in self.live_gateways())

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no request is in flight on this Gateway; False if ``timeout`` passed first."""
        if self.in_flight == 0:
            return True
        if self._idle is None:
            self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def abort_live(self) -> int:
        """End every live upstream exchange now (shutdown past its grace): streams get a final SSE error
        event and ``[DONE]``, waiting requests a 503. Returns how many were aborted."""
        count = 0
        for guard in tuple(self.watchdog.guards):
            if guard.expired is None and guard.task is not None:
                guard.expired = "shutdown"
                guard.task.cancel()
                count += 1
        return count

    # -- one request --------------------------------------------------------------------------------------
    async def handle(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        """Run the pipeline for one exchange; always runs ``exchange_done`` once."""
        pipeline = self.pipeline
        out: ClientStream | None = None
        self.in_flight += 1
        try:
            content = request.content
            if content.is_eof():  # the whole body is here (nearly always): taken as it is, no read loop
                body = exchange.body = content.read_nowait()
                if len(body) > request.client_max_size:  # (the limit request.read() would check)
                    raise web.HTTPRequestEntityTooLarge(request.client_max_size, len(body))
            else:
                exchange.body = await self._read_body(request)
            if exchange.ingress == "anthropic":
                translate_anthropic_ingress(exchange)
            validate(exchange)
            if pipeline.has_authenticate:
                await pipeline.authenticate(exchange)
            reply = await pipeline.check_request(exchange) if pipeline.has_check_request else None
            if reply is None and pipeline.has_cached_response:
                reply = await pipeline.cached_response(exchange)
            if reply is not None:
                exchange.outcome = Outcome.SHORT_CIRCUIT
                exchange.status = reply.status
                resp = await send_reply(request, exchange, reply, pipeline)
                return resp
            routes = (await pipeline.select_route(exchange) if pipeline.select_route_awaits
                      else pipeline.select_route_now(exchange))
            if not routes:
                raise GatewayError(404, f"The model `{exchange.model}` does not exist or is not served here.",
                                   param="model", code="model_not_found")
            if len(exchange.body) >= RELEASE_PARSED_FROM and self._parse_not_needed(exchange, routes):
                exchange._json = None  # freed now, while in cache, not when the answer (or stream) ends
            if exchange.stream:
                out = ClientStream(request, exchange, self.forwarder.loop)
                self.active_streams += 1
            return await self.forwarder.forward(request, exchange, routes, out)
        except (web.HTTPRequestEntityTooLarge, web.RequestPayloadError) as exc:
            return await self._reject(request, exchange, _body_error(exc))
        except GatewayError as exc:
            exchange.error = exc
            exchange.status = exc.status
            if exchange.outcome is None:
                exchange.outcome = Outcome.REJECTED if exc.status < 500 else Outcome.ERROR
            if isinstance(exc, PluginError):
                exchange.outcome = Outcome.ERROR
            elif getattr(exc, "kind", None) == "timeout":
                exchange.outcome = Outcome.TIMEOUT
            if out is not None and out.committed:  # a keepalive sent the 200: the error goes in-band
                exchange.status = 200
                return await out.fail(exc)
            resp = error_response(exc, exchange.response_headers, exchange)
            await resp.prepare(request)
            await resp.write_eof()
            _close_if_body_unread(request)
            return resp
        except StopStream as stop:  # an on_response hook refused a non-stream answer
            exchange.outcome = Outcome.STOPPED
            # (a plugin's Reply; an upstream's answer is stopped in forwarding, where its id and usage are known)
            body = stopped_answer(exchange.endpoint, {"model": exchange.upstream_model or exchange.model},
                                  stop.finish_reason)
            exchange.status = 200
            resp = json_response(answer_body(exchange, orjson.dumps(body)), 200, exchange.response_headers)
            await resp.prepare(request)
            await resp.write_eof()
            return resp
        except (asyncio.CancelledError, ConnectionError):
            exchange.outcome = Outcome.CLIENT_DISCONNECT
            exchange.status = 499
            raise
        finally:
            if out is not None:
                self.active_streams -= 1
            exchange.ended = time.monotonic()
            try:
                if pipeline.exchange_done_awaits:
                    await self._exchange_done(exchange)
                else:
                    pipeline.exchange_done_now(exchange)
            finally:
                self.in_flight -= 1
                if self.in_flight == 0 and self._idle is not None:
                    self._idle.set()

    async def record_unmatched(self, exchange: Exchange, status: int) -> None:
        """``exchange_done`` for a request no route matched (404, or 405 for a known path): the access log and
        the metrics see it (route ``unmatched``; the path in the state's ``"path"``), like every other request."""
        exchange.status = status
        exchange.outcome = Outcome.REJECTED
        exchange.ended = time.monotonic()
        await self._exchange_done(exchange)

    async def _exchange_done(self, exchange: Exchange) -> None:
        """Run ``exchange_done`` to its end even if the handler is cancelled meanwhile (aiohttp cancels it
        when the client closes the connection, which may happen right after the last byte). Synchronous
        implementations cannot be interrupted, so the task and shield are paid only when one awaits."""
        pipeline = self.pipeline
        if not pipeline.exchange_done_awaits:
            pipeline.exchange_done_now(exchange)
            return
        task = asyncio.get_running_loop().create_task(pipeline.exchange_done(exchange))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)
        await asyncio.shield(task)

    def _parse_not_needed(self, exchange: Exchange, routes: list[Route]) -> bool:
        """Whether forwarding can do without the parsed request: no ``upstream_request`` hook, no route renaming
        the model, and adapters that send the client's bytes as they are. A plugin that reads ``exchange.json``
        after routing then parses the body again."""
        if self.pipeline.has_upstream_request:
            return False
        model = exchange.model
        providers = self.providers
        for route in routes:
            provider = providers.get(route.provider)
            if provider is None or provider.reads_payload or route.model != model:
                return False
        return True

    def plugin(self, name: str) -> Any:
        """The plugin object registered under a pipeline name (None if absent)."""
        return self.plugin_manager.get_plugin(name)

    async def _read_body(self, request: web.Request) -> bytes:
        """The request body, within ``server.request_body_timeout`` when it is still arriving. ``handle`` reads a
        body that is all here itself (one coroutine frame less) and calls this for the others. Raises
        GatewayError: 408 (too slow), 413 (over ``server.max_request_size``), 400 (unreadable)."""
        try:
            if request.content.is_eof() or not self.body_timeout:
                return await request.read()
            async with asyncio.timeout(self.body_timeout):
                return await request.read()
        except TimeoutError:
            raise GatewayError(408, f"The request body did not arrive within {self.body_timeout:g} seconds "
                               "(server.request_body_timeout).", code="request_body_timeout") from None
        except (web.HTTPRequestEntityTooLarge, web.RequestPayloadError) as exc:
            raise _body_error(exc) from None

    async def _reject(self, request: web.Request, exchange: Exchange, exc: GatewayError) -> web.StreamResponse:
        exchange.error, exchange.status, exchange.outcome = exc, exc.status, Outcome.REJECTED
        resp = error_response(exc, exchange.response_headers, exchange)
        await resp.prepare(request)
        await resp.write_eof()
        _close_if_body_unread(request)
        return resp

    async def _answer_json(self, request: web.Request, exchange: Exchange,
                           answer: Callable[[], Awaitable[bytes]]) -> web.StreamResponse:
        """A small JSON endpoint (the model list, one model, a token count): ``answer`` authenticates and builds
        the body, or raises GatewayError; the 200 or the rejection, and ``exchange_done`` (once), are done here."""
        try:
            body = await answer()
            exchange.outcome, exchange.status = Outcome.OK, 200
            resp = json_response(body, 200, exchange.response_headers)
            await resp.prepare(request)
            await resp.write_eof()
            return resp
        except GatewayError as exc:
            return await self._reject(request, exchange, exc)
        except (asyncio.CancelledError, ConnectionError):
            exchange.outcome, exchange.status = Outcome.CLIENT_DISCONNECT, 499
            raise
        finally:
            exchange.ended = time.monotonic()
            await self._exchange_done(exchange)

    async def handle_models(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        """``GET /v1/models``: authenticate, then list the union of the providers' models (those the caller's
        key may use)."""
        async def answer() -> bytes:
            await self.pipeline.authenticate(exchange)
            await self.discover_models()
            return models_body([name for name in self.models() if _may_use(exchange, name)])

        return await self._answer_json(request, exchange, answer)

    async def handle_model(self, request: web.Request, exchange: Exchange, model: str) -> web.StreamResponse:
        """``GET /v1/models/{model}`` (the OpenAI SDK's ``models.retrieve``): authenticate, then answer the model's
        object, as ``/v1/models`` lists it, or 404 ``model_not_found``.

        A model is served when a request for it would be routed and answered, not only when ``/v1/models`` lists
        it: when an enabled provider lists it or matches it by one of its ``models`` patterns, the test the
        router makes (``plugins/router.py``), and the provider's adapter does not know better
        (:meth:`proxy.upstream.Provider.serves`: the simulated provider also asks its simulator). A provider configured with ``models: ["gpt-4*"]`` cannot list
        ``gpt-4o``, yet answers it, and a client that retrieves a model before using it must not be told it does
        not exist. Router aliases and ``provider/model`` names are not looked at: they belong to the router
        plugin (another router may have neither), and ``/v1/models`` does not list them either.

        A model the principal's ``allowed_models`` excludes is answered as unknown (404, not 403), so that a key
        does not learn what it may not use; ``/v1/models`` leaves it out the same way.
        """
        async def answer() -> bytes:
            exchange.model = model
            await self.pipeline.authenticate(exchange)
            served = any(provider.serves(model) for provider in self.providers.values())
            if not served or not _may_use(exchange, model):
                raise _model_not_found(model)
            return model_body(model)

        return await self._answer_json(request, exchange, answer)

    async def handle_count_tokens(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        """``POST /v1/messages/count_tokens`` (the anthropic SDK's ``messages.count_tokens``): answer
        ``{"input_tokens": N}``, in Anthropic's shape, without calling any upstream.

        N is the gateway's rule-of-thumb estimate of the prompt (:func:`proxy.tokens.estimate_prompt_tokens`:
        about four characters a token, plus the chat format's per-message framing), not a tokenizer's count: the
        body is checked and translated as ``/v1/messages`` does it (system, messages, tools; ``max_tokens`` is
        not required), and the translated OpenAI-format body is what is estimated. Content the translation
        drops (thinking blocks, documents) is not counted.

        As on ``/v1/messages``, the body is checked before ``authenticate`` runs (an auth plugin's 401 applies).
        A model the principal's ``allowed_models`` excludes is answered 404, as ``/v1/models/{model}`` does;
        whether a provider serves the model is not checked (router aliases count tokens too). ``check_request``
        does not run: a count is not a completion, so it is not rate-limited or moderated as one, and neither
        ``cached_response`` nor routing is involved. Errors are Anthropic error bodies; ``exchange_done`` runs
        once (endpoint ``messages.count_tokens``, ingress ``anthropic``; no usage is recorded).
        """
        async def answer() -> bytes:
            exchange.body = await self._read_body(request)
            body = anthropic_count_tokens_body(exchange.body)
            exchange.json = body  # as on /v1/messages, plugins (an auth hook, the access log) see the translation
            exchange.model = model = body["model"]
            await self.pipeline.authenticate(exchange)
            if not _may_use(exchange, model):
                raise _model_not_found(model)
            return orjson.dumps({"input_tokens": estimate_prompt_tokens("chat.completions", body)})

        return await self._answer_json(request, exchange, answer)


def _may_use(exchange: Exchange, model: str) -> bool:
    """Whether the caller's key may use ``model`` (its principal's ``allowed_models``; no principal: yes)."""
    allowed = exchange.principal.allowed_models if exchange.principal is not None else None
    return allowed is None or any(fnmatchcase(model, pattern) for pattern in allowed)


def _model_not_found(model: str) -> GatewayError:
    return GatewayError(404, f"The model `{model}` does not exist or you do not have access to it.", param="model",
                        code="model_not_found")

def _body_error(exc: Exception) -> GatewayError:
    """The client's error for a body aiohttp could not hand over: over the size limit (413), or a broken chunked
    encoding or a body its Content-Encoding cannot decode (400)."""
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return GatewayError(413, "Request body is larger than the configured limit (server.max_request_size).",
                            code="request_too_large")
    return GatewayError(400, "The request body could not be read: its chunked encoding is malformed or its "
                        "Content-Encoding does not decode.", code="invalid_request_body")


def _close_if_body_unread(request: web.Request) -> None:
    """After an error answer to a request whose body was not read to its end (too slow, undecodable): close the
    connection once the answer is out. Left open, aiohttp would go on reading and discarding the body for up to
    10 s ("lingering"), and a body that cannot be read would raise there again and be logged as a crash."""
    if not request.content.is_eof():
        request.protocol.force_close()  # the transport sends what was written before it closes


def _check_settings(config: Config, plugins: list[Any], origins: Origins) -> tuple[Any, ...]:
    """What the schema cannot check alone, checked before anything starts (``check-config`` builds a Gateway
    too, so it refuses what ``serve`` would): the trusted proxies parse, the metrics listener has a port of its
    own, ``redis.url`` is one server's URL, and a plugin with ``backend: redis`` has one. Returns the trusted networks; raises
    ConfigError with every problem."""
    problems = []
    trusted: list[Any] = []
    for index, value in enumerate(config.server.trusted_proxies):
        try:
            trusted.append(ip_network(value, strict=False))
        except ValueError as exc:
            problems.append(origins.problem(("server", "trusted_proxies", index), f"not an address or CIDR: {exc}"))
    server, metrics_port = config.server, config.observability.metrics_port
    if metrics_port and metrics_port == server.port:
        problems.append(origins.problem(("observability", "metrics_port"),
                                        f"the same port as server.port ({server.port}): give /metrics a port of its "
                                        "own, or leave metrics_port out to serve /metrics on the main port"))
    tls = tls_problem(server.tls_cert_file, server.tls_key_file)
    if tls is not None:
        problems.append(origins.problem(("server", tls[0]), tls[1]))
    if config.redis.url:
        try:
            check_redis_url(config.redis.url)
        except ValueError as exc:  # (a Redis Cluster's list of nodes, a scheme missing, a Sentinel URL's path)
            problems.append(origins.problem(("redis", "url"), f"not a Redis URL ({exc}); expected one server, "
                                            "redis://[:password@]host:port/db, rediss:// or unix://, or a Sentinel "
                                            "group, redis+sentinel://[:password@]host:26379[,host:26379]/service"))
    else:
        for index, plugin in enumerate(plugins):
            if getattr(plugin.config, "backend", None) == "redis":
                problems.append(origins.problem(("pipeline", index, plugin.name, "backend"),
                                                "backend: redis needs redis.url (the Redis every replica shares)"))
    if problems:
        raise ConfigError(problems)
    return tuple(trusted)


def _with_builtins(config: Config) -> tuple[PipelineEntry, ...]:
    """The configured pipeline plus the plugins that settings elsewhere in the config turn on, when not listed
    explicitly: the observability plugins (metrics, access log; they only implement ``exchange_done``, so their
    place is irrelevant), and ``provider_limits`` when a provider sets ``rate_limit`` (a limit that is
    configured is enforced, whatever the pipeline lists)."""
    entries = list(config.pipeline)
    names = {e.name for e in entries}
    obs = config.observability
    limited = any(p.rate_limit is not None for p in config.providers)
    for name, enabled in (("metrics", obs.metrics), ("access_log", obs.access_log), ("provider_limits", limited)):
        if enabled and name not in names:
            entries.append(PipelineEntry(name))
    return tuple(entries)
