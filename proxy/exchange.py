"""The Exchange: everything the gateway knows about one request, shared by every hook of that request."""
from __future__ import annotations

import time
from typing import Any, TypeVar

import attrs
import orjson

from .errors import GatewayError

__all__ = ["Exchange", "Principal", "Route", "Reply", "Usage", "Outcome"]

T = TypeVar("T")


class Outcome:
    """How an exchange ended (``Exchange.outcome``)."""

    OK = "ok"  #: a full answer reached the client
    ERROR = "error"  #: the upstream or the gateway failed (status >= 500, or an SSE error event)
    REJECTED = "rejected"  #: a plugin or validation refused it (4xx)
    SHORT_CIRCUIT = "short_circuit"  #: a plugin answered it (cache hit, refusal)
    CLIENT_DISCONNECT = "client_disconnect"  #: the client went away before the end
    TIMEOUT = "timeout"  #: a first-token, idle or total timeout ended it
    STOPPED = "stopped"  #: an on_chunk hook stopped the stream (StopStream)


@attrs.define(slots=True)
class Principal:
    """Who is calling, as established by an ``authenticate`` hook."""

    name: str
    tier: str | None = None
    allowed_models: tuple[str, ...] | None = None
    metadata: dict[str, Any] = attrs.field(factory=dict)


@attrs.define(slots=True)
class Route:
    """One candidate upstream for an exchange: a provider and the model name to send it."""

    provider: str
    model: str


@attrs.define(slots=True)
class Reply:
    """A complete answer produced by a plugin instead of an upstream (cache hit, refusal, ...).

    Either ``body`` (a JSON-serializable object, sent as ``application/json``) or ``chunks`` (a list of
    JSON objects or raw SSE event bytes, sent as an event stream followed by ``[DONE]``), optionally with
    per-chunk ``delays`` in seconds for faithful replay. A streaming request given only a ``body`` gets it
    as a one-chunk stream; a non-stream request given only ``chunks`` gets them merged by the gateway.
    """

    body: Any = None
    chunks: list[Any] | None = None
    status: int = 200
    headers: dict[str, str] = attrs.field(factory=dict)
    delays: list[float] | None = None


@attrs.define(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Usage | None":
        if type(d) is not dict:
            return None if not isinstance(d, dict) else cls.from_dict(dict(d))
        p = d.get("prompt_tokens") or d.get("input_tokens") or 0
        c = d.get("completion_tokens") or d.get("output_tokens") or 0
        t = d.get("total_tokens")
        if type(p) is not int or type(c) is not int or type(t) is not int:  # a float or a string: make them ints
            p, c = int(p), int(c)
            t = int(t or p + c)
        return cls(p, c, t or p + c)


@attrs.define(slots=True, eq=False)
class Exchange:
    """One request and its answer, as it passes through the pipeline.

    Plugins read it and write the fields their phase owns: ``principal`` (authenticate), ``routes`` (select_route),
    ``state`` (anything, namespaced by the plugin). The gateway fills ``provider``, ``status``, ``usage``,
    ``outcome``, ``error`` and the timings. ``exchange_done`` sees the final values.
    """

    request_id: str
    #: "chat.completions", "completions", "embeddings", "models", "messages.count_tokens", or "unmatched" (no route
    #: matched the request: only ``exchange_done`` sees it, with the method and path in ``state["path"]``)
    endpoint: str
    ingress: str = "openai"  #: the client's wire format: "openai", or "anthropic" for ``/v1/messages``
    body: bytes = b""
    headers: Any = None  #: the client's request headers (case-insensitive mapping)
    client_ip: str | None = None
    _json: Any = None
    model: str | None = None
    stream: bool = False
    include_usage: bool = False  #: the client asked for ``stream_options.include_usage``
    principal: Principal | None = None
    routes: list[Route] = attrs.field(factory=list)
    #: What a stream does when its upstream fails after content was sent: "error" (final SSE error event and
    #: ``[DONE]``) or "continue" (the next route continues the answer). Set by the router per model group.
    on_midstream_failure: str = "error"
    attempts: list[dict[str, Any]] = attrs.field(factory=list)
    provider: str | None = None
    upstream_model: str | None = None
    status: int = 0
    outcome: str | None = None
    error: GatewayError | None = None
    usage: Usage | None = None
    chunks_sent: int = 0
    bytes_sent: int = 0
    started: float = attrs.field(factory=time.monotonic)
    first_byte_at: float | None = None  #: when the first content event reached the client
    ended: float | None = None
    state: dict[Any, Any] = attrs.field(factory=dict)
    #: Short labels plugins attach for logs and metrics ("cache_hit", "moderation_flagged", "ratelimited", ...).
    tags: set[str] = attrs.field(factory=set)
    upstream_sent_at: float | None = None  #: when the first upstream request was sent (monotonic)
    upstream_first_at: float | None = None  #: when the first upstream event/body arrived (monotonic)
    trace_id: str | None = None  #: W3C trace id (from ``traceparent``, or generated)
    response_headers: dict[str, str] = attrs.field(factory=dict)

    @property
    def json(self) -> Any:
        """The request body parsed as JSON (parsed once).

        Read it freely; to change the request sent upstream, either assign a new object (``exchange.json =
        {...}``: the body is re-serialized from it, so every later phase and every route sees it) or edit
        ``request.json`` in an ``upstream_request`` hook. In-place edits of this dict are not sent upstream.

        Once a long request (8 KiB or more) is routed, the gateway may let go of the parsed object when
        forwarding does not need it; reading ``json`` after that parses the body again, into a new object.
        Keep what a later phase needs in ``state`` rather than in this dict.
        """
        if self._json is None and self.body:
            self._json = orjson.loads(self.body)
        return self._json

    @json.setter
    def json(self, value: Any) -> None:
        self._json = value
        self.body = orjson.dumps(value)

    def state_of(self, cls: type[T]) -> T:
        """Per-exchange state of one plugin, created on first use: ``exchange.state_of(MyState).count += 1``."""
        try:
            return self.state[cls]  # type: ignore[no-any-return]
        except KeyError:
            value = self.state[cls] = cls()
            return value

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first content event sent (streams) or the answer (non-stream)."""
        return None if self.first_byte_at is None else self.first_byte_at - self.started

    @property
    def duration(self) -> float | None:
        return None if self.ended is None else self.ended - self.started
