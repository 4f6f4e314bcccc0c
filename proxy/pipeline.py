"""The async walk over the plugins' hook implementations, in the order of the config's ``pipeline:`` list.

pluggy calls hooks synchronously and orders them LIFO; ssegate needs awaited hooks, config order and
short-circuits, so the walk is written here, once. Each hook's implementations are resolved when the pipeline
is built (never per request): a hook nobody implements is a ``None`` check, and an implementation's argument
subset and sync/async nature are decided up front.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import pluggy
import structlog

from .errors import GatewayError, StopStream
from .exchange import Exchange, Principal, Reply, Route
from .sse import Chunk

__all__ = ["Pipeline", "PluginError"]

log = structlog.get_logger("ssegate.pipeline")


class PluginError(GatewayError):
    """A plugin raised something other than GatewayError/StopStream: the request fails closed with a 500."""

    def __init__(self, plugin: str, hook: str, exc: BaseException) -> None:
        super().__init__(500, f"internal error in plugin {plugin!r} ({hook})", code="plugin_error")
        self.plugin, self.hook, self.original = plugin, hook, exc


#: What a first-result hook may return besides None (``select_route``'s list is checked by ``_routes``).
_RESULT_TYPES: dict[str, type] = {"authenticate": Principal, "check_request": Reply, "cached_response": Reply}


def _wrong_result(impl: "_Impl", result: Any, expected: str) -> TypeError:
    return TypeError(f"{impl.hook} returned {type(result).__name__}, not {expected} or None")


def _routes(impl: "_Impl", result: Any) -> list[Route]:
    """``select_route``'s result as the list the gateway keeps, checked: a list (or tuple) of Route."""
    if not isinstance(result, (list, tuple)):
        raise _wrong_result(impl, result, "a list of Route")
    for route in result:
        if not isinstance(route, Route):
            raise TypeError(f"select_route returned a list holding {type(route).__name__}, not Route")
    return list(result)  # the gateway's own list, whatever the plugin keeps of the one it returned


class _Impl:
    __slots__ = ("plugin", "hook", "call", "is_async")

    def __init__(self, plugin: str, hook: str, call: Callable[..., Any], is_async: bool) -> None:
        self.plugin, self.hook, self.call, self.is_async = plugin, hook, call, is_async


def _bind(function: Callable[..., Any], argnames: tuple[str, ...], spec_args: tuple[str, ...]) -> Callable[..., Any]:
    """Adapt an implementation that takes a subset of the spec's arguments to a positional call."""
    if argnames == spec_args:
        return function
    idx = tuple(spec_args.index(a) for a in argnames)
    if idx == (0,):
        return lambda *a: function(a[0])
    if idx == (1,):
        return lambda *a: function(a[1])
    if not idx:
        return lambda *a: function()
    return lambda *a: function(*(a[i] for i in idx))


class Pipeline:
    """Ordered, pre-resolved hook implementations and the phase functions the gateway calls."""

    def __init__(self, pm: pluggy.PluginManager, order: list[str]) -> None:
        self.pm = pm
        self.order = order
        rank = {name: i for i, name in enumerate(order)}
        self._impls: dict[str, list[_Impl]] = {}
        for hook_name in ("register_metrics", "startup", "shutdown", "authenticate", "check_request", "cached_response",
                          "select_route", "upstream_request", "on_chunk", "on_response", "exchange_done"):
            caller = getattr(pm.hook, hook_name)
            spec_args = tuple(caller.spec.argnames)
            impls = sorted(caller.get_hookimpls(), key=lambda i: rank.get(i.plugin_name, len(rank)))
            bound = []
            for impl in impls:
                fn = impl.function
                is_async = inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)
                if hook_name == "on_chunk" and is_async:
                    raise GatewayError(500, f"plugin {impl.plugin_name!r}: on_chunk must be synchronous")
                bound.append(_Impl(impl.plugin_name, hook_name, _bind(fn, tuple(impl.argnames), spec_args), is_async))
            self._impls[hook_name] = bound
        chunk_impls = self._impls["on_chunk"]
        #: The per-chunk chain, or None when no plugin implements on_chunk (the relay then skips Chunk objects).
        self.on_chunk: Callable[[Exchange, Chunk], list[Chunk]] | None = (
            self._make_chunk_chain(chunk_impls) if chunk_impls else None
        )
        self.has_on_response = bool(self._impls["on_response"])
        #: exchange_done needs protection from cancellation only when some implementation awaits.
        self.exchange_done_awaits = any(i.is_async for i in self._impls["exchange_done"])
        self.has_upstream_request = bool(self._impls["upstream_request"])
        self._started: set[str] = set()  # plugins the startup walk reached (see startup/shutdown)
        #: Admission phases anybody implements (the gateway skips the others without a call).
        self.has_authenticate = bool(self._impls["authenticate"])
        self.has_check_request = bool(self._impls["check_request"])
        self.has_cached_response = bool(self._impls["cached_response"])
        self._exchange_done_sync = [(i.plugin, i.call) for i in self._impls["exchange_done"]]
        #: select_route needs a coroutine only when some implementation awaits (the default router does not).
        self.select_route_awaits = any(i.is_async for i in self._impls["select_route"])

    def implementations(self, hook_name: str) -> list[str]:
        """Plugin names implementing a hook, in call order."""
        return [i.plugin for i in self._impls[hook_name]]

    async def _call(self, impl: _Impl, *args: Any) -> Any:
        try:
            result = impl.call(*args)
            if impl.is_async:
                result = await result
            return result
        except (GatewayError, StopStream):
            raise
        except Exception as exc:
            log.error("plugin_failed", plugin=impl.plugin, hook=impl.hook, error=repr(exc), exc_info=exc)
            raise PluginError(impl.plugin, impl.hook, exc) from exc

    # -- lifecycle ----------------------------------------------------------------------------------------
    async def startup(self, gateway: Any) -> None:
        """Start the plugins in order; the first failure aborts, naming the plugin. Only plugins the walk
        reached (started, or without a ``startup``) get ``shutdown`` later."""
        failed_at = len(self.order)
        try:
            for impl in self._impls["startup"]:
                try:
                    await self._call(impl, gateway)
                except PluginError as exc:
                    failed_at = self.order.index(impl.plugin)
                    raise GatewayError(500, f"plugin {exc.plugin!r} failed to start: {exc.original}",
                                       code="plugin_startup_failed") from exc.original
                except GatewayError as exc:
                    failed_at = self.order.index(impl.plugin)
                    raise GatewayError(500, f"plugin {impl.plugin!r} failed to start: {exc.message}",
                                       code="plugin_startup_failed") from exc
        finally:
            self._started = set(self.order[:failed_at])

    async def register_metrics(self, registry: Any) -> None:
        for impl in self._impls["register_metrics"]:
            try:
                await self._call(impl, registry)
            except PluginError as exc:
                raise GatewayError(500, f"plugin {exc.plugin!r} failed to register metrics: {exc.original}",
                                   code="plugin_startup_failed") from exc.original
            except GatewayError as exc:
                raise GatewayError(500, f"plugin {impl.plugin!r} failed to register metrics: {exc.message}",
                                   code="plugin_startup_failed") from exc

    async def shutdown(self, gateway: Any) -> None:
        for impl in self._impls["shutdown"]:
            if impl.plugin not in self._started:
                continue  # its startup failed or never ran: there is nothing of it to close
            try:
                await self._call(impl, gateway)
            except Exception:  # logged by _call; shutdown goes on for the others
                pass

    # -- request phases -----------------------------------------------------------------------------------
    async def _first_result(self, hook: str, *args: Any) -> Any:
        """Walk ``hook``'s implementations in order; return the first non-None result (None if none)."""
        for impl in self._impls[hook]:
            try:
                result = impl.call(*args)
                if impl.is_async:
                    result = await result
            except (GatewayError, StopStream):
                raise
            except Exception as exc:
                raise self._failed(impl, exc) from exc
            if result is not None:
                try:
                    if hook == "select_route":
                        return _routes(impl, result)
                    if not isinstance(result, _RESULT_TYPES[hook]):
                        raise _wrong_result(impl, result, _RESULT_TYPES[hook].__name__)
                except TypeError as exc:  # fail closed, naming the plugin (not an anonymous error later on)
                    raise self._failed(impl, exc) from None
                return result
        return None

    @staticmethod
    def _failed(impl: _Impl, exc: Exception) -> PluginError:
        log.error("plugin_failed", plugin=impl.plugin, hook=impl.hook, error=repr(exc), exc_info=exc)
        return PluginError(impl.plugin, impl.hook, exc)

    async def authenticate(self, exchange: Exchange) -> Principal | None:
        result = await self._first_result("authenticate", exchange)
        if result is not None:
            exchange.principal = result
        return result  # type: ignore[no-any-return]

    async def check_request(self, exchange: Exchange) -> Reply | None:
        return await self._first_result("check_request", exchange)  # type: ignore[no-any-return]

    async def cached_response(self, exchange: Exchange) -> Reply | None:
        return await self._first_result("cached_response", exchange)  # type: ignore[no-any-return]

    async def select_route(self, exchange: Exchange) -> list[Route] | None:
        result = await self._first_result("select_route", exchange)
        if result is not None:
            exchange.routes = result
        return result  # type: ignore[no-any-return]

    def select_route_now(self, exchange: Exchange) -> list[Route] | None:
        """``select_route`` when no implementation awaits (``not select_route_awaits``): no coroutine."""
        for impl in self._impls["select_route"]:
            try:
                result = impl.call(exchange)
            except (GatewayError, StopStream):
                raise
            except Exception as exc:
                raise self._failed(impl, exc) from exc
            if result is not None:
                routes = list(result) if type(result) is list else None
                if routes is not None:  # the usual list of Route, checked inline (no call per request)
                    for route in routes:
                        if type(route) is not Route:
                            routes = None
                            break
                if routes is None:
                    try:
                        routes = _routes(impl, result)
                    except TypeError as exc:
                        raise self._failed(impl, exc) from None
                exchange.routes = routes
                return routes
        return None

    async def upstream_request(self, exchange: Exchange, request: Any) -> None:
        for impl in self._impls["upstream_request"]:
            await self._call(impl, exchange, request)

    async def on_response(self, exchange: Exchange, body: Any) -> Any:
        for impl in self._impls["on_response"]:
            result = await self._call(impl, exchange, body)
            if result is not None:
                body = result
        return body

    async def exchange_done(self, exchange: Exchange) -> None:
        for impl in self._impls["exchange_done"]:
            try:
                await self._call(impl, exchange)
            except Exception:  # already logged with the plugin name; the others still run
                pass

    def exchange_done_now(self, exchange: Exchange) -> None:
        """``exchange_done`` when no implementation awaits (``not exchange_done_awaits``): no coroutine."""
        for plugin, call in self._exchange_done_sync:
            try:
                call(exchange)
            except Exception as exc:  # logged with the plugin name; the others still run
                log.error("plugin_failed", plugin=plugin, hook="exchange_done", error=repr(exc), exc_info=exc)

    # -- per chunk ----------------------------------------------------------------------------------------
    @staticmethod
    def _make_chunk_chain(impls: list[_Impl]) -> Callable[[Exchange, Chunk], list[Chunk]]:
        calls = [(i.plugin, i.call) for i in impls]

        def chain(exchange: Exchange, chunk: Chunk) -> list[Chunk]:
            chunks = [chunk]
            for plugin, call in calls:
                out: list[Chunk] = []
                for c in chunks:
                    try:
                        result = call(exchange, c)
                    except (GatewayError, StopStream):
                        raise
                    except Exception as exc:
                        log.error("plugin_failed", plugin=plugin, hook="on_chunk", error=repr(exc), exc_info=exc)
                        raise PluginError(plugin, "on_chunk", exc) from exc
                    if result is None:
                        out.append(c)
                    elif type(result) is list and all(type(r) is Chunk or isinstance(r, Chunk) for r in result):
                        out.extend(result)
                    else:  # fail closed, naming the plugin: not a broken answer blamed on the provider
                        exc = TypeError(f"on_chunk returned {type(result).__name__}, not a list of Chunk or None"
                                        if type(result) is not list else "on_chunk returned a list holding "
                                        + ", ".join(sorted({type(r).__name__ for r in result if not isinstance(r, Chunk)}))
                                        + ", not Chunk")
                        log.error("plugin_failed", plugin=plugin, hook="on_chunk", error=repr(exc))
                        raise PluginError(plugin, "on_chunk", exc)
                chunks = out
                if not chunks:
                    break
            return chunks

        return chain
