"""The hook API of ssegate: every phase a plugin can join, in the order the pipeline runs them.

A plugin is a module or an object with functions named like the specs below, marked with
``@proxy.hookimpl``. It implements only the hooks it needs; a hook nobody implements costs nothing.
Plugins run in the order of the config's ``pipeline:`` list. Hooks marked *async allowed* may be ``async def``;
the pipeline awaits them. ``on_chunk`` is always synchronous: it runs once per SSE event.

Lifecycle of one request::

    authenticate → check_request → cached_response → select_route
      → upstream_request → (on_chunk per event | on_response) → exchange_done

``exchange_done`` runs exactly once per request, whatever happened. An exception in any other hook fails
closed: the request ends with a 500 in OpenAI format (or, if a stream has begun, a final SSE error event),
logged with the plugin's name. Raise :class:`proxy.GatewayError` to end a request with a chosen status.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from aioprometheus.collectors import Registry

    from .exchange import Exchange, Principal, Reply, Route
    from .gateway import Gateway
    from .sse import Chunk
    from .upstream import UpstreamRequest

#: Version of the hook API. Bumped (minor) when hooks or arguments are added, (major) when changed.
HOOK_API_VERSION = "1.1"  # 1.1: upstream_request may raise RouteDeclined

hookspec = pluggy.HookspecMarker("ssegate")
hookimpl = pluggy.HookimplMarker("ssegate")


# -- process lifecycle --------------------------------------------------------------------------------------

@hookspec
def startup(gateway: "Gateway") -> None:
    """Called once when the gateway starts serving (and after each config reload), before any request.

    Open pools, load files, start background tasks here. *Async allowed.* An exception aborts startup.

    :param gateway: the running gateway: ``gateway.config``, ``gateway.providers``, ``gateway.plugin_config(name)``.
    """


@hookspec
def shutdown(gateway: "Gateway") -> None:
    """Called once when the gateway stops (or a reloaded config retires this plugin instance).

    Close what ``startup`` opened. *Async allowed.* Exceptions are logged and ignored.
    """


@hookspec
def register_metrics(registry: "Registry") -> None:
    """Create this plugin's Prometheus collectors, before ``startup``: when serving starts and again for the new
    plugin instances of each config reload.

    ``registry`` is the process's ``aioprometheus.Registry`` (it survives config reloads, so counters do not
    reset). Create collectors with :func:`proxy.metrics.counter`, :func:`proxy.metrics.gauge` and
    :func:`proxy.metrics.histogram`, which return the existing collector when a reload asks again. Name them
    ``<yourplugin>_...``; keep label values bounded (never request ids or keys). Update them in
    ``exchange_done``, once per exchange, not per chunk. *Async allowed.*
    """


# -- admission ----------------------------------------------------------------------------------------------

@hookspec(firstresult=True)
def authenticate(exchange: "Exchange") -> "Principal | None":
    """Establish who is calling. First result wins.

    Return a :class:`proxy.Principal` to accept the caller (it is stored in ``exchange.principal``), None to
    leave the decision to the next plugin, or raise ``GatewayError(401, ...)`` to refuse. When no plugin
    returns a principal the request proceeds anonymously (``exchange.principal is None``); an auth plugin
    that requires a key must therefore raise. *Async allowed.*
    """


@hookspec
def check_request(exchange: "Exchange") -> "Reply | None":
    """Admit or refuse the request, after authentication. Every plugin runs, in pipeline order.

    Return None to pass, raise :class:`proxy.GatewayError` to refuse with that status (400 invalid input,
    403 forbidden model, 429 rate limited, ...), or return a :class:`proxy.Reply` to answer without any
    upstream (for example a moderation refusal written as an assistant message); later plugins then do not
    run. To rewrite the request (add a system message, cap ``max_tokens``), assign a new object to
    ``exchange.json``: it is what every route is sent (``exchange.model`` and ``exchange.stream`` keep the values
    read from the client's body). *Async allowed.*
    """


@hookspec(firstresult=True)
def cached_response(exchange: "Exchange") -> "Reply | None":
    """Offer a complete answer instead of calling an upstream (a cache hit). First result wins.

    Return a :class:`proxy.Reply` (``body`` and/or ``chunks``; chunks are replayed as a stream, optionally with
    ``delays``) or None. ``on_chunk``/``on_response`` hooks still see the reply, so output checks hold for
    cached answers too. *Async allowed.*
    """


# -- routing and the upstream call --------------------------------------------------------------------------

@hookspec(firstresult=True)
def select_route(exchange: "Exchange") -> "list[Route] | None":
    """Choose the upstreams for this request, in the order to try them. First result wins.

    Return a list of :class:`proxy.Route` (provider name and the model name to send); the gateway tries them
    in order, falling back to the next one on a connect error, timeout, 429 or 5xx before anything reached
    the client. An empty list means "no provider serves this model" (404 ``model_not_found``). The built-in
    ``router`` plugin implements it; put your own router before it in the pipeline to override it.
    *Async allowed.*
    """


@hookspec
def upstream_request(exchange: "Exchange", request: "UpstreamRequest") -> None:
    """Edit the request about to be sent to a provider (once per attempt). Every plugin runs.

    ``request.json`` is the body as a dict (edit it in place; it is re-serialized only if touched through
    ``request.json``), ``request.headers`` a mutable dict, ``request.route`` the route being tried. To read the
    body without touching it, use ``request.payload``: for a ``/v1/messages`` client routed to an ``anthropic``
    provider, a changed body is sent as its translation instead of the client's own request, which loses what
    the OpenAI format has no field for (``cache_control``, citations).

    To pass over this route instead (a provider at its quota, a budget spent), raise
    :class:`proxy.RouteDeclined`: nothing is sent, the route is not retried, and the next route is tried; a
    request no route takes gets that error (hook API 1.1). Any other exception fails the request closed.
    *Async allowed.*
    """


# -- the answer ---------------------------------------------------------------------------------------------

@hookspec
def on_chunk(exchange: "Exchange", chunk: "Chunk") -> "list[Chunk] | None":
    """Inspect or change one SSE event of a live stream before it is written to the client. Synchronous.

    Called for every data event in arrival order, including the final ``[DONE]`` (``chunk.is_done``); not for
    SSE comments (upstream or the gateway's own keepalives), which pass through untouched. Return None to pass the chunk on unchanged (after any
    :meth:`Chunk.set_json`), or a list of chunks to send in its place: ``[]`` drops it (or holds it back, to be
    returned later with another chunk), ``[held, chunk]`` releases held chunks. The next plugin in the pipeline
    sees each returned chunk. Raise :class:`proxy.StopStream` to end the stream cleanly with a final
    ``finish_reason``, a usage chunk if the client asked for one, and ``[DONE]`` (the upstream is closed before it
    counted the answer: ``exchange.usage`` is then an estimate, tagged ``usage_estimated``: the prompt by rule of
    thumb, a token per event sent). ``chunk.json`` is parsed only if a plugin reads it.

    ``[DONE]`` is the gateway's to write: whatever the hooks return for it (``[]``, held chunks, added ones),
    ``[DONE]`` follows them, and a ``[DONE]`` returned in place of another event is dropped. Anything else than
    None or a list of :class:`proxy.Chunk` fails the request closed, as an exception does (``plugin_error``).
    """


@hookspec
def on_response(exchange: "Exchange", body: Any) -> Any:
    """Inspect or change a non-stream JSON answer before it is sent. Every plugin runs, in order.

    ``body`` is the parsed JSON of a successful upstream answer. Return None to keep it (in-place edits are
    kept), or a new object to send instead; raise ``GatewayError`` or ``StopStream`` to refuse it (StopStream
    turns it into an answer with the given ``finish_reason`` and no content). *Async allowed.*
    """


@hookspec
def exchange_done(exchange: "Exchange") -> None:
    """Called exactly once per request, after the last byte was sent or the request ended otherwise.

    Runs on success, upstream error, rejection by a plugin or validation, client disconnect and timeout;
    ``exchange.outcome`` says which (see :class:`proxy.exchange.Outcome`), ``exchange.usage`` holds the
    token counts (exact for streams, the gateway asks upstreams for ``stream_options.include_usage``).
    Count usage, store cache entries, write access logs and metrics here. *Async allowed.* Exceptions are
    logged with the plugin's name and do not affect other plugins.
    """
