"""ssegate: a streaming gateway for LLM APIs. The public API for plugin authors lives here."""
from ._version import __version__
from .errors import GatewayError, StopStream
from .exchange import Exchange, Outcome, Principal, Reply, Route, Usage
from .hookspecs import HOOK_API_VERSION, hookimpl
from .sse import Chunk

__all__ = [
    "__version__",
    "HOOK_API_VERSION",
    "hookimpl",
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
