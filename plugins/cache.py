"""The response cache: exact-match answers replayed without calling an upstream.

A request's key is a hash of its semantic fields (everything in the body except transport fields such as
``stream``, ``stream_options`` and ``user``; the model after alias resolution), optionally scoped to the
caller. A miss records what the client received — the chunk sequence of a stream (with its pacing) or the
body — and ``exchange_done`` stores it when the answer was complete and successful. A hit is replayed as a
faithful stream (same chunk boundaries and content, fresh ``id``/``created``, usage when asked for) or as a
body, whichever the request wants, whatever the entry holds.

Hooks: ``startup``/``shutdown`` (backend), ``cached_response`` (key, lookup, replay), ``on_chunk`` and
``on_response`` (recording a miss; one dict lookup and a flag test per chunk otherwise), ``exchange_done``
(storing, and evicting an entry whose replay a later output check stopped). See docs/cache-and-moderation.md.
"""
from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING, Any

import attrs
import orjson
import structlog

from proxy import GatewayError, Outcome, Reply, hookimpl
from proxy.anthropic_format import ANTHROPIC_EXTRAS
from proxy.openai_format import body_to_chunks, merge_chunks, new_id
from proxy.sse import DONE, Chunk

from ._cache_store import ENTRY_VERSION, LRUMemoryCache, SharedRedisCache, decode_entry, encode_entry
from ._validators import one_of

if TYPE_CHECKING:
    from proxy import Exchange
    from proxy.gateway import Gateway

__all__ = ["CachePlugin", "CacheConfig", "CacheState", "CacheStats"]

log = structlog.get_logger("ssegate.cache")

#: Part of every key: bump it when the key derivation changes so old entries are never matched wrongly.
KEY_VERSION = 1

#: Body fields that never change the answer: left out of the key.
DEFAULT_IGNORED_FIELDS = ("stream", "stream_options", "user", "metadata", "store", "service_tier",
                          "safety_identifier", "prompt_cache_key")

_ENDPOINTS = ("chat.completions", "completions", "embeddings")
_NOT_CACHEABLE = frozenset({"models"})


def _positive(_: Any, attribute: attrs.Attribute, value: Any) -> None:  # type: ignore[type-arg]
    if value is not None and value <= 0:
        raise ValueError(f"cache: {attribute.name} must be positive, got {value!r}")


def _not_negative(_: Any, attribute: attrs.Attribute, value: Any) -> None:  # type: ignore[type-arg]
    if value < 0:
        raise ValueError(f"cache: {attribute.name} must not be negative, got {value!r}")


def _endpoints(_: Any, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:  # type: ignore[type-arg]
    unknown = [v for v in value if v not in _ENDPOINTS]
    if unknown:
        raise ValueError(f"cache: endpoints: unknown endpoint {unknown[0]!r} (known: {', '.join(_ENDPOINTS)})")


#: Request headers that carry a caller's credential, by client kind (``per_key`` without an auth plugin).
_CREDENTIAL_HEADERS = ("Authorization", "x-api-key", "api-key")


@attrs.frozen
class CacheConfig:
    """Settings of the ``cache`` plugin (every key is documented in docs/cache-and-moderation.md)."""

    backend: str = attrs.field(default="memory", validator=one_of("memory", "redis", plugin="cache"), metadata={
        "doc": "`memory`: this process, bounded, least recently used out first. `redis`: shared by every replica "
               "on the gateway's Redis pool (`redis.url` required; startup fails without it)."})
    ttl: float | None = attrs.field(default=3600.0, validator=_positive, metadata={
        "doc": "Lifetime of an entry, seconds. Null: until evicted (memory) or forever (Redis)."})
    namespace: str = attrs.field(default="shared", validator=one_of("shared", "per_key", plugin="cache"), metadata={
        "doc": "`shared`, or `per_key`: separate entries per caller (principal name, else the `Authorization` "
               "header, else anonymous; hashed into the key)."})
    key_prefix: str = attrs.field(default="ssegate:cache", metadata={
        "doc": "Prefix of every key (Redis keys are `<prefix>:<namespace>:<sha256>`)."})
    max_entries: int = attrs.field(default=10_000, validator=_positive, metadata={
        "doc": "Memory backend: entries kept."})
    max_bytes: int = attrs.field(default=256 * 2**20, validator=_positive, metadata={
        "doc": "Memory backend: bytes kept (keys + encoded entries)."})
    max_entry_bytes: int = attrs.field(default=2**20, validator=_positive, metadata={
        "doc": "Answers larger than this (encoded, or recorded so far) are not stored."})
    compression: bool = attrs.field(default=False, metadata={
        "doc": "zlib-compress entries (each entry is tagged, so switching it never makes entries unreadable)."})
    compression_min_bytes: int = attrs.field(default=1024, validator=_not_negative, metadata={
        "doc": "Smaller entries are stored uncompressed."})
    only_deterministic: bool = attrs.field(default=True, metadata={
        "doc": "Cache only requests with `temperature: 0` or a `seed` (embeddings always); others get "
               "`x-cache: BYPASS`."})
    endpoints: tuple[str, ...] = attrs.field(default=_ENDPOINTS, validator=_endpoints, metadata={
        "doc": "Endpoints cached: `chat.completions`, `completions`, `embeddings`."})
    ignore_fields: tuple[str, ...] = attrs.field(default=DEFAULT_IGNORED_FIELDS, metadata={
        "doc": "Request body fields left out of the cache key."})
    model_aliases: dict[str, str] = attrs.field(factory=dict, metadata={
        "doc": "Model names that share entries, e.g. `{gpt4: gpt-4o}` (the router's aliases apply as well)."})
    honor_cache_control: bool = attrs.field(default=True, metadata={
        "doc": "Obey the client's `Cache-Control` request header (`no-cache`, `no-store`, `max-age`)."})
    replay_pacing: bool = attrs.field(default=False, metadata={
        "doc": "Replay a streamed hit with the original gaps between chunks."})
    replay_speed: float = attrs.field(default=1.0, validator=_positive, metadata={
        "doc": "Divide the replay gaps by this (2.0: twice as fast)."})
    timeout: float = attrs.field(default=0.5, validator=_positive, metadata={
        "doc": "Redis backend: longest wait per operation, seconds."})


class CacheState:
    """Per-exchange state of the cache (``exchange.state_of(CacheState)``)."""

    __slots__ = ("key", "status", "recording", "raws", "times", "size", "done", "body", "hit", "stored", "attempt")

    def __init__(self) -> None:
        self.key: str | None = None
        self.status: str | None = None  #: "HIT", "MISS" or "BYPASS"
        self.recording = False  #: a miss whose answer is being recorded
        self.raws: list[bytes] = []
        self.times: list[float] = []
        self.size = 0
        self.done = False  #: ``[DONE]`` went through on_chunk
        self.body: bytes | None = None
        self.hit: dict[str, Any] | None = None  #: the entry served, on a hit
        self.stored = False
        self.attempt = 0  #: ``len(exchange.attempts)`` when the last chunk was recorded


@attrs.define
class CacheStats:
    """Counters of one cache plugin instance (a later metrics plugin exports them)."""

    hits: int = 0
    misses: int = 0
    bypasses: int = 0
    stores: int = 0
    bytes_stored: int = 0  #: encoded bytes written (after compression)
    bytes_served: int = 0  #: encoded bytes of the entries served on hits
    tokens_saved: int = 0  #: total_tokens of the answers served from the cache
    errors: int = 0  #: backend failures (each counted request continued without the cache)
    evicted_stopped: int = 0  #: entries deleted because a later output check stopped their replay
    not_stored: dict[str, int] = attrs.field(factory=dict)  #: reason -> count

    def skip(self, reason: str) -> None:
        self.not_stored[reason] = self.not_stored.get(reason, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _cache_control(value: str | None) -> tuple[bool, bool, float | None]:
    """(no_cache, no_store, max_age) from a request's ``Cache-Control`` header."""
    if not value:
        return False, False, None
    no_cache = no_store = False
    max_age = None
    for part in value.lower().split(","):
        name, _, arg = part.strip().partition("=")
        if name == "no-cache":
            no_cache = True
        elif name == "no-store":
            no_store = True
        elif name == "max-age":
            try:
                max_age = max(0.0, float(arg.strip().strip('"')))
            except ValueError:
                pass
    return no_cache, no_store, max_age


def _finished(chunks: list[dict[str, Any]]) -> bool:
    """Every choice that appeared in the stream has a finish_reason."""
    seen: set[int] = set()
    finished: set[int] = set()
    for chunk in chunks:
        for choice in chunk.get("choices") or ():
            idx = choice.get("index", 0)
            seen.add(idx)
            if choice.get("finish_reason"):
                finished.add(idx)
    return bool(seen) and seen == finished


def _body_complete(endpoint: str, body: Any) -> bool:
    if not isinstance(body, dict) or "error" in body:
        return False
    if endpoint == "embeddings":
        return isinstance(body.get("data"), list) and bool(body["data"])
    choices = body.get("choices")
    return bool(choices) and all(isinstance(c, dict) and c.get("finish_reason") for c in choices)


def _text_body_to_chunks(body: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
    """A ``text_completion`` body as the chunks of its stream (``body_to_chunks`` handles chat only)."""
    base = {"id": body.get("id"), "object": "text_completion", "created": body.get("created"),
            "model": body.get("model")}
    chunks = []
    for choice in body.get("choices") or ():
        idx = choice.get("index", 0)
        chunks.append({**base, "choices": [{"index": idx, "text": choice.get("text") or "", "logprobs": None,
                                            "finish_reason": None}]})
        chunks.append({**base, "choices": [{"index": idx, "text": "", "logprobs": None,
                                            "finish_reason": choice.get("finish_reason") or "stop"}]})
    if include_usage and body.get("usage"):
        chunks.append({**base, "choices": [], "usage": body["usage"]})
    return chunks


class CachePlugin:
    """The built-in ``cache`` plugin (``pipeline: [{cache: {...}}, ...]``)."""

    Config = CacheConfig

    def __init__(self, config: CacheConfig | None = None) -> None:
        self.config = config or CacheConfig()
        self.stats = CacheStats()
        self._ignored = frozenset(self.config.ignore_fields)
        self._endpoints = frozenset(self.config.endpoints)
        self.backend: Any = None
        if self.config.backend == "memory":
            self.backend = LRUMemoryCache(max_entries=self.config.max_entries, max_bytes=self.config.max_bytes)
        self._last_error_log = 0.0
        self._router_aliases: dict[str, tuple[str, ...]] = {}

    # -- lifecycle ------------------------------------------------------------------------------------------
    @hookimpl
    async def startup(self, gateway: "Gateway") -> None:
        try:  # the router's aliases: requests naming one alias (or its single target) share entries
            aliases = getattr(gateway.plugin_config("router"), "aliases", None)
        except KeyError:
            aliases = None
        self._router_aliases = dict(aliases) if isinstance(aliases, dict) else {}
        pipeline = getattr(gateway, "pipeline", None)
        if self.config.namespace == "shared" and pipeline is not None and pipeline.has_authenticate:
            # Callers are told apart, but the cache does not: say so once (a logger bound now, not the module's
            # cached one, so that what tests capture sees it too).
            structlog.get_logger("ssegate.cache").warning(
                "cache_shared_across_keys", namespace="shared",
                detail="callers are authenticated, yet one caller's cached answer is served to another sending "
                       "the same deterministic request; set namespace: per_key to keep them apart")
        # A config reload builds new plugin instances: hand the memory entries and the counters over.
        state = getattr(gateway, "process_state", None)
        if state is not None:
            self.stats = state.setdefault("cache.stats", self.stats)
            if self.config.backend == "memory":
                memory = state.setdefault("cache.memory", self.backend)
                if memory is not self.backend:
                    await memory.resize(self.config.max_entries, self.config.max_bytes)
                    self.backend = memory
        if self.config.backend == "redis":
            if not gateway.config.redis.url:
                raise GatewayError(500, "the cache plugin's redis backend needs redis.url in the configuration",
                                   code="redis_not_configured")
            self.backend = SharedRedisCache(gateway.redis, timeout=self.config.timeout)

    @hookimpl
    async def shutdown(self, gateway: "Gateway") -> None:
        if self.backend is not None:
            await self.backend.close()

    # -- keys -----------------------------------------------------------------------------------------------
    def key_for(self, body: dict[str, Any], endpoint: str = "chat.completions", scope: str | None = None,
                model: str | None = None) -> str:
        """The cache key of a request body (``scope``: the caller, used when ``namespace: per_key``).

        Raises TypeError/ValueError for bodies that cannot be keyed (orjson refuses them).
        """
        fields: dict[str, Any] = {}
        ignored = self._ignored
        for name, value in body.items():
            if value is None or name in ignored:
                continue
            if type(value) is float and value.is_integer():
                value = int(value)  # temperature 0 and 0.0 are one request
            fields[name] = value
        fields["model"] = self.resolve_model(model if model is not None else body.get("model"))
        if fields.get("n") == 1:
            del fields["n"]
        if isinstance(fields.get("stop"), str):
            fields["stop"] = [fields["stop"]]
        payload = orjson.dumps([KEY_VERSION, endpoint, fields], option=orjson.OPT_SORT_KEYS)
        digest = hashlib.sha256(payload).hexdigest()
        if self.config.namespace == "per_key":
            space = "k-" + hashlib.sha256((scope or "anonymous").encode()).hexdigest()[:20]
        else:
            space = "shared"
        return f"{self.config.key_prefix}:{space}:{digest}"

    def resolve_model(self, model: Any) -> Any:
        """The model as keyed: ``model_aliases`` first, then the router's aliases (one target: that target; several:
        the ordered target list, so two aliases for the same list share entries)."""
        if not isinstance(model, str):
            return model
        model = self.config.model_aliases.get(model, model)
        targets = self._router_aliases.get(model)
        if targets:
            return targets[0] if len(targets) == 1 else "|".join(targets)
        return model

    @staticmethod
    def _scope(exchange: "Exchange") -> str:
        """Whose entries (``per_key``): the principal's name, else the caller's credential as sent (OpenAI's
        ``Authorization``, Anthropic's ``x-api-key``, Azure's ``api-key``), else "anonymous"."""
        if exchange.principal is not None:
            return "p:" + exchange.principal.name
        headers = exchange.headers
        if headers is not None:
            for name in _CREDENTIAL_HEADERS:
                value = headers.get(name)
                if value:
                    return f"a:{name}:{value}"
        return "anonymous"

    def _deterministic(self, exchange: "Exchange") -> bool:
        if exchange.endpoint == "embeddings" or not self.config.only_deterministic:
            return True
        body = exchange.json
        return body.get("temperature") == 0 or body.get("seed") is not None

    # -- lookup and replay ----------------------------------------------------------------------------------
    @hookimpl
    async def cached_response(self, exchange: "Exchange") -> Reply | None:
        if exchange.endpoint not in self._endpoints:
            return None
        st = exchange.state_of(CacheState)
        cc = exchange.headers.get("Cache-Control") if exchange.headers is not None else None
        no_cache, no_store, max_age = _cache_control(cc) if self.config.honor_cache_control else (False, False, None)
        if not self._deterministic(exchange) or (no_cache and no_store):
            return self._bypass(exchange, st)
        body = exchange.json
        extras = exchange.state.get(ANTHROPIC_EXTRAS)  # (/v1/messages: thinking, top_k beside the translation)
        if extras is not None:
            body = {**body, ANTHROPIC_EXTRAS: extras}
        try:
            st.key = self.key_for(body, exchange.endpoint, self._scope(exchange), exchange.model)
        except (TypeError, ValueError):  # e.g. an integer orjson cannot serialize
            return self._bypass(exchange, st)
        if not no_cache:
            entry, size = await self._lookup(st.key)
            if entry is not None and max_age is not None and time.time() - entry["stored_at"] > max_age:
                entry = None
            if entry is not None and self._servable(exchange, entry):
                return self._hit(exchange, st, entry, size)
        if no_cache:
            self._bypass(exchange, st)
        else:
            st.status = exchange.response_headers["x-cache"] = "MISS"
            self.stats.misses += 1
        st.recording = not no_store
        return None

    def _bypass(self, exchange: "Exchange", st: CacheState) -> None:
        st.status = exchange.response_headers["x-cache"] = "BYPASS"
        self.stats.bypasses += 1
        return None

    async def _lookup(self, key: str) -> tuple[dict[str, Any] | None, int]:
        try:
            blob = await self.backend.get(key)
        except Exception as exc:  # an unavailable cache must not fail the request: continue without it
            self._backend_failed("get", exc)
            return None, 0
        return decode_entry(blob), len(blob) if blob else 0

    def _backend_failed(self, op: str, exc: BaseException) -> None:
        self.stats.errors += 1
        now = time.monotonic()
        if now - self._last_error_log >= 10.0:  # one line per 10 s during an outage, not one per request
            self._last_error_log = now
            log.warning("cache_backend_failed", op=op, backend=self.config.backend, error=repr(exc),
                        errors=self.stats.errors)

    @staticmethod
    def _servable(exchange: "Exchange", entry: dict[str, Any]) -> bool:
        if exchange.endpoint == "embeddings":
            return entry.get("kind") == "body" and not exchange.stream
        return entry.get("kind") in ("stream", "body")

    def _hit(self, exchange: "Exchange", st: CacheState, entry: dict[str, Any], size: int) -> Reply:
        st.status = exchange.response_headers["x-cache"] = "HIT"
        exchange.response_headers["age"] = str(max(0, int(time.time() - entry["stored_at"])))
        st.hit = entry
        tags = getattr(exchange, "tags", None)  # labels for the access log and metrics plugins
        if tags is not None:
            tags.add("cache_hit")
        stats = self.stats
        stats.hits += 1
        stats.bytes_served += size
        usage = entry.get("usage")
        if isinstance(usage, dict):
            stats.tokens_saved += int(usage.get("total_tokens") or 0)
        created = int(time.time())
        fresh_id = new_id("chatcmpl" if exchange.endpoint == "chat.completions" else "cmpl")
        if entry["kind"] == "stream":
            chunks = entry["chunks"]
            for chunk in chunks:
                if "id" in chunk:
                    chunk["id"] = fresh_id
                if "created" in chunk:
                    chunk["created"] = created
            if exchange.stream:
                if exchange.include_usage and usage:
                    last = chunks[-1] if chunks else {}
                    tail = {k: last[k] for k in ("id", "object", "created", "model", "system_fingerprint")
                            if k in last}
                    chunks.append({**tail, "choices": [], "usage": usage})
                delays = None
                if self.config.replay_pacing and entry.get("delays"):
                    speed = self.config.replay_speed
                    delays = [d / speed for d in entry["delays"]]
                return Reply(chunks=chunks, delays=delays)
            body = merge_chunks(chunks)
            if usage:
                body["usage"] = usage
            return Reply(body=body)
        body = entry["body"]
        if "id" in body:
            body["id"] = fresh_id
        if "created" in body:
            body["created"] = created
        if not exchange.stream:
            return Reply(body=body)
        if body.get("object") == "text_completion":
            return Reply(chunks=_text_body_to_chunks(body, exchange.include_usage))
        return Reply(chunks=body_to_chunks(body, include_usage=exchange.include_usage))

    # -- recording a miss -----------------------------------------------------------------------------------
    @hookimpl
    def on_chunk(self, exchange: "Exchange", chunk: Chunk) -> None:
        st = exchange.state.get(CacheState)
        if st is None or not st.recording:
            return None
        raw = chunk.raw
        if raw == DONE or (raw.endswith(b"[DONE]") and chunk.is_done):
            st.done = True
            return None
        attempt = len(exchange.attempts)
        if attempt != st.attempt:
            if exchange.chunks_sent == 0:  # a retry or fallback after a failed attempt the client never saw
                st.raws, st.times, st.size = [], [], 0
            st.attempt = attempt
        st.raws.append(raw)
        st.times.append(time.monotonic())
        st.size += len(raw)
        if st.size > self.config.max_entry_bytes:
            st.recording = False
            st.raws, st.times = [], []
            self.stats.skip("too_large")
        return None

    @hookimpl
    def on_response(self, exchange: "Exchange", body: Any) -> None:
        st = exchange.state.get(CacheState)
        if st is not None and st.recording:
            st.body = orjson.dumps(body)  # a snapshot: later plugins may edit the object in place
        return None

    # -- storing --------------------------------------------------------------------------------------------
    @hookimpl
    async def exchange_done(self, exchange: "Exchange") -> None:
        st = exchange.state.get(CacheState)
        if st is None:
            return
        if st.hit is not None:
            if exchange.outcome == Outcome.STOPPED and st.key is not None:
                # A later output check (moderation after a rule change) refused the cached answer: drop it.
                self.stats.evicted_stopped += 1
                try:
                    await self.backend.delete(st.key)
                except Exception as exc:
                    self._backend_failed("delete", exc)
            return
        if not st.recording or st.key is None:
            return
        st.recording = False
        if exchange.outcome != Outcome.OK or exchange.error is not None:
            self.stats.skip(str(exchange.outcome or "unknown"))
            return
        entry = self._entry(exchange, st)
        if entry is None:
            return
        blob = encode_entry(entry, self.config.compression, self.config.compression_min_bytes)
        if len(blob) > self.config.max_entry_bytes:
            self.stats.skip("too_large")
            return
        try:
            ok = await self.backend.set(st.key, blob, ttl=self.config.ttl)
        except Exception as exc:
            self._backend_failed("set", exc)
            return
        if ok is False:
            self.stats.skip("too_large")
            return
        st.stored = True
        self.stats.stores += 1
        self.stats.bytes_stored += len(blob)

    def _entry(self, exchange: "Exchange", st: CacheState) -> dict[str, Any] | None:
        usage = exchange.usage
        entry: dict[str, Any] = {"v": ENTRY_VERSION, "endpoint": exchange.endpoint, "stored_at": time.time(),
                                 "usage": attrs.asdict(usage) if usage is not None else None}
        if exchange.stream:
            if not st.done or not st.raws:
                self.stats.skip("incomplete")
                return None
            chunks: list[dict[str, Any]] = []
            usage_raw = None
            for raw in st.raws:
                obj = Chunk(raw).json
                if not isinstance(obj, dict):
                    continue
                if obj.get("usage"):
                    usage_raw = obj["usage"]
                    if not obj.get("choices"):
                        continue  # the usage chunk: replayed from entry["usage"] when the client asks
                    obj = {**obj, "usage": None}
                chunks.append(obj)
            if not _finished(chunks):
                self.stats.skip("incomplete")
                return None
            if usage_raw is not None:
                entry["usage"] = usage_raw
            times = st.times
            entry["kind"] = "stream"
            entry["chunks"] = chunks
            entry["delays"] = [0.0] + [round(b - a, 4) for a, b in zip(times, times[1:])]
            return entry
        if st.body is None:
            self.stats.skip("incomplete")
            return None
        body = orjson.loads(st.body)
        if not _body_complete(exchange.endpoint, body):
            self.stats.skip("incomplete")
            return None
        if isinstance(body.get("usage"), dict):
            entry["usage"] = body["usage"]
        entry["kind"] = "body"
        entry["body"] = body
        return entry

    # -- for tests and admin tools --------------------------------------------------------------------------
    async def entry(self, key: str) -> dict[str, Any] | None:
        """The stored entry under ``key`` (decoded), or None."""
        return decode_entry(await self.backend.get(key))

    async def clear(self) -> None:
        """Remove every entry of this cache (memory: all; redis: the keys under ``key_prefix``)."""
        if isinstance(self.backend, LRUMemoryCache):
            await self.backend.clear()
            return
        client = self.backend.client
        async for key in client.scan_iter(match=f"{self.config.key_prefix}:*", count=500):
            await client.delete(key)
