"""The runner that serves the gateway's application: aiohttp's ``AppRunner``, with the API's POST routes
dispatched without the router and parser errors answered in the OpenAI format.

**Direct dispatch.** aiohttp's ``Application._handle`` resolves every request through the router (match info,
the apps' chain, the ``Expect`` check) before it calls the handler: some 200 bytecodes a request, about a tenth
of everything the gateway adds to a bare passthrough (``docs/performance.md``). The API's POST routes are fixed
paths, so :func:`direct_dispatch` looks a POST's path up in a dict and returns its handler's coroutine itself (no
frame of its own); every other request, and any request with an ``Expect`` header, goes through the application
as before. It applies only when the application has no middleware (CORS configured adds one), so nothing that
should see every request is skipped.
"""
from __future__ import annotations

from typing import Awaitable, Callable

from aiohttp import hdrs, web

from .app_keys import DIRECT_ROUTES
from .parser_errors import with_json_parser_errors

__all__ = ["GatewayRunner", "direct_dispatch"]

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def direct_dispatch(app: web.Application, direct: dict[str, Handler]) -> Handler:
    """The server's request handler: a POST to a path of ``direct`` goes straight to its handler, everything
    else to ``app._handle`` (the router, middlewares, 404 and 405). The path is compared as sent
    (``raw_path``: percent-encoding kept, as the router compares it), so ``/v1/chat%2Fcompletions`` is the
    router's 404 either way.

    PRIVATE aiohttp attribute, here only: ``Application._handle``, what ``AppRunner`` makes the server's
    handler (aiohttp 3.x, read against 3.14.5)."""
    routed = app._handle
    lookup = direct.get
    expect = hdrs.EXPECT

    def dispatch(request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        if request.method == "POST":
            handler = lookup(request.rel_url.raw_path)
            if handler is not None and expect not in request.headers:
                return handler(request)
        return routed(request)  # type: ignore[arg-type]

    return dispatch


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` (app startup, cleanup, the same kwargs) whose server dispatches the API directly
    (:func:`direct_dispatch`, when the app has ``DIRECT_ROUTES``) and answers parser errors in the OpenAI format
    (:func:`proxy.parser_errors.with_json_parser_errors`).

    ``_make_server`` is BaseRunner's (private) hook that AppRunner and ServerRunner implement; if a future
    aiohttp stops calling it, this runner is a plain AppRunner."""

    __slots__ = ()

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        app = self.app
        direct = app.get(DIRECT_ROUTES)
        handler = direct_dispatch(app, direct) if direct and not app.middlewares else None
        return with_json_parser_errors(server, handler)
