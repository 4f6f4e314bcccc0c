"""What the gateway sends to a provider and what comes back, independent of the provider's wire format.

A provider adapter (``proxy/providers/``) turns an :class:`UpstreamRequest` into an :class:`UpstreamResponse`
whose stream is a sequence of *batches* of raw OpenAI-format SSE events: one batch per upstream read, so the
relay writes and flushes each read at once and never buffers more.
"""
from __future__ import annotations

from fnmatch import fnmatchcase

from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Mapping

import orjson

from .errors import GatewayError

if TYPE_CHECKING:
    from .upstream_sessions import SharedSessions
    from .config.schema import ProviderConfig
    from .exchange import Exchange, Route

__all__ = ["UpstreamRequest", "UpstreamResponse", "UpstreamError", "Provider", "ENDPOINT_PATHS", "broken_answer",
           "retry_headers"]

#: Bumped whenever a provider's discovered model list changes (routers cache their plans per model name).
DISCOVERY_GENERATION = [0]

#: Exchange endpoint name -> path below a provider's base URL.
ENDPOINT_PATHS = {
    "chat.completions": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
}


class UpstreamError(GatewayError):
    """A failure talking to a provider before anything of its answer reached the client.

    ``retryable`` failures (connect errors, timeouts, 429, 5xx) are retried on the same provider, then the next
    route is tried; ``fallback`` failures (default: the retryable ones; also an upstream's 401, 403 and 404) let the
    next route answer without a retry. ``kind`` is a short label for logs and metrics: connect, timeout, status,
    auth, protocol, ... ``detail`` is for the gateway's log only (an address, a library's exception text): the
    client's message names the provider, not the network behind it.
    """

    def __init__(self, status: int, message: str, *, kind: str, retryable: bool,
                 body: dict[str, Any] | None = None, detail: str | None = None, fallback: bool | None = None,
                 **kw: Any) -> None:
        super().__init__(status, message, **kw)
        self.kind = kind
        self.retryable = retryable
        self.fallback = retryable if fallback is None else fallback
        self.body = body
        self.detail = detail

    def to_dict(self) -> dict[str, Any]:
        """The upstream's own error object when it sent one (its members kept: Azure's ``innererror``, ...),
        completed to OpenAI's ``message``, ``type``, ``param`` and ``code``; else the gateway's."""
        err = self.body.get("error") if self.body is not None else None
        if not isinstance(err, dict):
            return super().to_dict()
        merged = dict(err)
        for key, value in (("message", self.message), ("type", self.type), ("param", self.param),
                           ("code", self.code)):
            if merged.get(key) in (None, ""):
                merged[key] = value
        return {"error": merged}


#: The headers of an upstream's error answer that say when to ask again; kept on the error, used for the
#: backoff and the cooldown, and passed on to the client with it (the official SDKs honour both).
RETRY_HEADERS = ("Retry-After", "Retry-After-Ms")


def retry_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The :data:`RETRY_HEADERS` an upstream sent (``headers`` case-insensitive, as aiohttp's are)."""
    return {name: headers[name] for name in RETRY_HEADERS if name in headers}


def broken_answer(provider: str, exc: BaseException) -> UpstreamError:
    """The error for an upstream answer that could not be read (a cut connection, a malformed chunked body)."""
    return UpstreamError(502, f"provider {provider!r}: its answer could not be read ({type(exc).__name__})",
                         kind="protocol", retryable=True, code="upstream_error", detail=str(exc))


#: The member :meth:`UpstreamRequest.ask_for_usage` splices into a body.
_USAGE_MEMBER = b'"stream_options":{"include_usage":true},'


class UpstreamRequest:
    """The request for one attempt on one route. Hooks edit ``json`` and ``headers``.

    The original client body bytes are forwarded untouched unless ``json`` is accessed for writing
    (through :attr:`json`) or the gateway needs a change (a model rename; ``stream_options``, which is spliced
    into the bytes where it can be). Adapters that translate the body read it from :attr:`payload`.
    """

    __slots__ = ("exchange", "route", "path", "headers", "_body", "_json", "_usage_spliced")

    def __init__(self, exchange: "Exchange", route: "Route", path: str) -> None:
        self.exchange = exchange
        self.route = route
        self.path = path
        self.headers: dict[str, str] = {}
        self._body: bytes | None = exchange.body
        self._json: dict[str, Any] | None = None
        self._usage_spliced = False

    @property
    def json(self) -> dict[str, Any]:
        """The body as a dict; accessing it means the body will be re-serialized from it."""
        if self._json is None:
            self._json = dict(self.exchange.json)
            if self._usage_spliced:
                self._json["stream_options"] = {"include_usage": True}
            self._body = None
        return self._json

    @property
    def edited(self) -> dict[str, Any] | None:
        """The body as hooks and the gateway edited it through :attr:`json`; None while nothing did."""
        return self._json

    @property
    def payload(self) -> dict[str, Any]:
        """The body as a dict, to read: what :attr:`body` sends, for adapters that translate it, without making
        the body be serialized again (as :attr:`json` does)."""
        if self._json is not None:
            return self._json
        body: dict[str, Any] = self.exchange.json
        return {**body, "stream_options": {"include_usage": True}} if self._usage_spliced else body

    def ask_for_usage(self) -> None:
        """Ask the upstream for the usage chunk (``stream_options.include_usage``).

        While the client's bytes go out unchanged and have no ``stream_options``, the member is spliced in after
        the object's opening brace: a long conversation is not serialized again (15.6 against 1.5 µs for a 36 kB
        body, on every streamed request of a client that does not ask for usage itself). Otherwise it is set in
        :attr:`json`."""
        body = self._body
        # (the byte search first: a body without the bytes has no such member, and its parse is not needed)
        if self._json is None and body is not None and (
                b'"stream_options"' not in body or "stream_options" not in self.exchange.json):
            brace = body.find(b"{")
            # after the brace, a member (never "}": a request has a model); only whitespace before it
            if brace >= 0 and not body[:brace].strip() and body[brace + 1:brace + 65].lstrip()[:1] not in (b"}", b""):
                self._body = body[:brace + 1] + _USAGE_MEMBER + body[brace + 1:]
                self._usage_spliced = True
                return
        body_json = self.json
        opts = body_json.get("stream_options")
        body_json["stream_options"] = {**opts, "include_usage": True} if isinstance(opts, dict) else {
            "include_usage": True}

    @property
    def body(self) -> bytes:
        if self._body is None:
            self._body = orjson.dumps(self._json)
        return self._body

    @property
    def stream(self) -> bool:
        return self.exchange.stream


class UpstreamResponse:
    """A provider's answer: ``status``, ``headers`` and either ``read()`` (whole body) or ``batches()``."""

    status: int = 200
    headers: Mapping[str, str] = {}

    async def read(self) -> bytes:
        raise NotImplementedError

    def batches(self) -> AsyncIterator[list[bytes]]:
        """Yield lists of raw OpenAI-format SSE events (without terminators), one list per upstream read."""
        raise NotImplementedError

    def raw_sse(self) -> Callable[[], Awaitable[bytes]] | None:
        """A read of the upstream's bytes (``b""`` at the end), when they already are an OpenAI-format event
        stream: the relay then parses them inline, two async frames less per read than ``batches()`` (no
        generator, no async iterator). None: use ``batches()``."""
        return None

    def close(self) -> None:
        """Release the connection; after a partial read the connection is closed, not reused."""


class Provider:
    """Base class of provider adapters. One instance per configured provider, one connection pool each."""

    #: Weight of the newest sample in the time-to-first-token moving average.
    TTFT_ALPHA = 0.2
    #: Whether the adapter reads the parsed request (:attr:`UpstreamRequest.payload` or ``json``) to build what it
    #: sends. An adapter that sends the client's bytes as they are (``request.body``) sets it False, which lets
    #: the gateway release the parsed tree of a long request once it is routed (see ``Gateway.handle``).
    reads_payload = True

    def __init__(self, config: "ProviderConfig") -> None:
        self.config = config
        self.name = config.name
        self.in_flight = 0
        #: Exponentially weighted moving average of time to first token, seconds (None until measured).
        self.ttft_ewma: float | None = None

    def observe_ttft(self, seconds: float) -> None:
        prev = self.ttft_ewma
        self.ttft_ewma = seconds if prev is None else prev + self.TTFT_ALPHA * (seconds - prev)

    async def start(self, sessions: "SharedSessions | None" = None) -> None:
        """Open pools (called once before serving). ``sessions``: the process's HTTP sessions, which a provider
        whose pool a reload left as it was takes over (see :mod:`proxy.upstream_sessions`)."""

    async def close(self) -> None:
        """Close pools."""

    #: Models the upstream listed itself (see :meth:`discover_models`), those the ``models`` patterns match.
    discovered: tuple[str, ...] = ()
    #: When :attr:`discovered` is due to be asked again (``loop.time()``); 0: never asked.
    discovered_until = 0.0

    def list_models(self) -> list[str]:
        """Concrete model names for ``/v1/models``: the configured ones (wildcard patterns are not listed), then
        those the upstream listed that the patterns match."""
        names = [m for m in self.config.models if "*" not in m and "?" not in m]
        return names + [m for m in self.discovered if m not in names] if self.discovered else names

    def wants_discovery(self) -> bool:
        """Whether ``/v1/models`` should ask the upstream for its models: enabled, and ``models`` has a pattern."""
        config = self.config
        return config.enabled and config.discover_models and any(
            "*" in m or "?" in m or "[" in m for m in config.models)

    async def discover_models(self) -> list[str] | None:
        """The upstream's own model names (``GET /models``), or None when this adapter cannot ask. Raises on a
        failure to ask (the caller keeps what it had)."""
        return None

    def set_discovered(self, names: list[str]) -> None:
        patterns = self.config.models
        discovered = tuple(dict.fromkeys(n for n in names if any(fnmatchcase(n, p) for p in patterns)))
        if discovered != self.discovered:
            self.discovered = discovered
            DISCOVERY_GENERATION[0] += 1

    def knows(self, model: str) -> bool | None:
        """Whether this provider names ``model`` itself: True when its ``models`` list it by name or the upstream
        listed it (:attr:`discovered`), False when the upstream's own list is known and lacks it, None when the
        gateway cannot tell (no list asked for yet, or none to ask: ``models`` patterns only)."""
        if model in self.config.models or model in self.discovered:
            return True
        return False if self.discovered else None

    def serves(self, model: str) -> bool:
        """Whether a request for ``model`` may be answered here, as far as the gateway can tell without asking the
        upstream (``GET /v1/models/{model}``): the provider is enabled and lists ``model`` or matches it by one of
        its ``models`` patterns, the test the router makes. An adapter that knows better narrows it."""
        config = self.config
        return config.enabled and (model in self.list_models()
                                   or any(fnmatchcase(model, pattern) for pattern in config.models))

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        """Send the request; raise :class:`UpstreamError` if no usable answer started."""
        raise NotImplementedError

    async def complete(self, request: UpstreamRequest) -> bytes:
        """A non-stream answer, whole, as OpenAI-format JSON bytes (``send``, ``read``, ``close``). Adapters may
        answer it more directly; errors as in ``send``, and read failures propagate."""
        response = await self.send(request)
        try:
            return await response.read()
        finally:
            response.close()
