"""ssegate: a streaming gateway for LLM APIs. The public API for plugin authors lives here.

Everything a plugin needs is importable from ``proxy`` and listed in ``__all__``; the package ships
``py.typed``, so these names are checked by mypy in plugin code:

- hooks: ``hookimpl`` (the marker of hook implementations, see :mod:`proxy.hookspecs`), ``HOOK_API_VERSION``;
- settings: ``plugin_config``, ``setting`` (a plugin's typed ``Config`` class);
- one request: ``Exchange`` and its parts ``Principal``, ``Route``, ``Reply``, ``Usage``, ``Outcome``;
  ``UpstreamRequest`` (what ``upstream_request`` hooks edit); ``Chunk`` (what ``on_chunk`` hooks see);
- errors: ``GatewayError`` (end a request with a status), ``RouteDeclined`` (pass over the route an
  ``upstream_request`` hook is asked about), ``StopStream`` (end a live stream cleanly);
- ``__version__``.

Other modules are internal and may change, except the helpers the docs point plugin authors to:
:mod:`proxy.metrics` (collectors for ``register_metrics``) and :mod:`proxy.testing` (plugin tests).
"""
from ._version import __version__
from .errors import GatewayError, RouteDeclined, StopStream
from .exchange import Exchange, Outcome, Principal, Reply, Route, Usage
from .hookspecs import HOOK_API_VERSION, hookimpl
from .plugin_config import plugin_config, setting
from .sse import Chunk
from .upstream import UpstreamRequest

__all__ = [
    "__version__",
    "HOOK_API_VERSION",
    "hookimpl",
    "plugin_config",
    "setting",
    "Exchange",
    "Outcome",
    "Principal",
    "Reply",
    "Route",
    "Usage",
    "UpstreamRequest",
    "Chunk",
    "GatewayError",
    "RouteDeclined",
    "StopStream",
]
