"""Typed keys of the aiohttp application's state."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from .gateway import Gateway

__all__ = ["GATEWAY", "RELOADER", "DIRECT_ROUTES", "GatewayHolder"]


class GatewayHolder:
    """The Gateway currently serving new requests (swapped on reload) and the drain flag."""

    __slots__ = ("current", "draining", "tls")

    def __init__(self, gateway: "Gateway") -> None:
        self.current = gateway
        self.draining = False
        #: The listener's TLS context when it serves HTTPS (``proxy.tls``): reloads load certificates into it.
        self.tls: Any = None


GATEWAY = web.AppKey("GATEWAY", GatewayHolder)
RELOADER: web.AppKey[Any] = web.AppKey("RELOADER")
#: ``{path: handler}`` of the POST routes the server may dispatch without the router (see
#: :class:`proxy.web_runner.GatewayRunner`); absent when a middleware must see every request.
DIRECT_ROUTES: web.AppKey[Any] = web.AppKey("DIRECT_ROUTES")
