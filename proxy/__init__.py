"""ssegate: a streaming gateway for LLM APIs. The public API for plugin authors lives here."""
from ._version import __version__
from .errors import GatewayError, StopStream
from .exchange import Exchange, Outcome, Principal, Reply, Route, Usage
from .hookspecs import HOOK_API_VERSION, hookimpl
from .plugin_config import plugin_config, setting
from .sse import Chunk

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
    "Chunk",
    "GatewayError",
    "StopStream",
]
