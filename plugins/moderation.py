"""Content moderation: rule-based input checks (plus an optional external ``/v1/moderations`` call) and
output checks on live streams with a hold-back window.

Input (``check_request``): the request's messages (roles in ``input_roles``) or prompt are scanned with the
input rules — keywords and regular expressions with categories and scores, and the built-in jailbreak
patterns. A category whose best score reaches its threshold flags the request; then, if nothing local
flagged it, the external service is asked. A flagged request gets a 400 ``content_policy_violation`` error
or, with ``refusal_mode: refusal``, an assistant message (streamed when the request streams) ending with
``finish_reason: "content_filter"``.

Output (``on_chunk``): each chunk's text is scanned incrementally — only the new text plus the last
``longest match - 1`` characters before it — so a flagged phrase split over any number of chunks is seen. Chunks
are held back until ``holdback_chars`` more characters have arrived after them (by default just enough that no
part of a flagged phrase is ever released), then released in order with their bytes unchanged. A violation
ends the stream with ``finish_reason: "content_filter"`` and ``[DONE]``; held chunks are dropped. Non-stream
answers (``on_response``) are scanned whole.

Rules come from the plugin config and from rule files; :meth:`ModerationPlugin.reload` re-reads the files and
swaps the compiled rules in one assignment (a bad file keeps the old rules). A request keeps the rules it
started with. See docs/cache-and-moderation.md.
"""
from __future__ import annotations

import asyncio
import os
import re
import time
from typing import TYPE_CHECKING, Any

import attrs
import orjson
import structlog

from proxy.tasks import stop_task
from proxy import GatewayError, Reply, StopStream, hookimpl
from proxy.config.load import ConfigError
from proxy.openai_format import new_id, reasoning_of
from proxy.sse import DONE, Chunk

from ._moderation_rules import Hit, Rule, RuleSet, compile_rules, mtime, normalize
from ._validators import one_of

if TYPE_CHECKING:
    from proxy import Exchange
    from proxy.gateway import Gateway

__all__ = ["ModerationPlugin", "ModerationConfig", "ExternalCheckConfig", "ModerationState", "ModerationStats",
           "Rule"]

log = structlog.get_logger("ssegate.moderation")
_loads = orjson.loads
_JSONDecodeError = orjson.JSONDecodeError

_ENDPOINTS = ("chat.completions", "completions", "embeddings")
_CONTEXT = 16  # characters kept before the scanned region, for \b and lookbehinds


def _fraction(_: Any, attribute: attrs.Attribute, value: float) -> None:  # type: ignore[type-arg]
    if not 0 <= value <= 1:
        raise ValueError(f"moderation: {attribute.name} must be between 0 and 1, got {value!r}")


def _fractions(_: Any, attribute: attrs.Attribute, value: dict[str, float]) -> None:  # type: ignore[type-arg]
    for category, threshold in value.items():
        if not 0 <= threshold <= 1:
            raise ValueError(f"moderation: {attribute.name}.{category} must be between 0 and 1, got {threshold!r}")


def _positive(_: Any, attribute: attrs.Attribute, value: Any) -> None:  # type: ignore[type-arg]
    if value is not None and value <= 0:
        raise ValueError(f"moderation: {attribute.name} must be positive, got {value!r}")


def _not_negative(_: Any, attribute: attrs.Attribute, value: Any) -> None:  # type: ignore[type-arg]
    if value is not None and value < 0:
        raise ValueError(f"moderation: {attribute.name} must not be negative, got {value!r}")


def _endpoints(_: Any, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:  # type: ignore[type-arg]
    unknown = [v for v in value if v not in _ENDPOINTS]
    if unknown:
        raise ValueError(f"moderation: endpoints: unknown endpoint {unknown[0]!r} (known: {', '.join(_ENDPOINTS)})")


@attrs.frozen
class ExternalCheckConfig:
    """An OpenAI-compatible moderation service asked about requests the local rules let through."""

    url: str = attrs.field(metadata={
        "doc": "The full endpoint URL, e.g. `https://api.openai.com/v1/moderations`."})
    api_key_env: str | None = attrs.field(default=None, metadata={
        "doc": "Environment variable holding the service's API key."})
    api_key: str | None = attrs.field(default=None, metadata={
        "doc": "The service's API key; prefer `api_key_env` or `${VAR}`."})
    model: str | None = attrs.field(default=None, metadata={"doc": "Moderation model, sent when set."})
    timeout: float = attrs.field(default=2.0, validator=_positive, metadata={
        "doc": "Seconds to wait for the service."})
    on_error: str = attrs.field(default="block", validator=one_of("block", "allow", plugin="moderation"), metadata={
        "doc": "Service unreachable or failing: `block` (503 `moderation_unavailable`, fail closed) or `allow` "
               "(pass and count)."})
    use_flagged: bool = attrs.field(default=False, metadata={
        "doc": "Also refuse when the service says `flagged` although no score reaches the threshold."})
    max_chars: int = attrs.field(default=20_000, validator=_positive, metadata={
        "doc": "The most recent input characters sent to the service."})

    @url.validator
    def _url(self, attribute: Any, value: str) -> None:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"moderation: external.url must start with http:// or https://, got {value!r}")


@attrs.frozen
class ModerationConfig:
    """Settings of the ``moderation`` plugin (every key is documented in docs/cache-and-moderation.md)."""

    threshold: float = attrs.field(default=0.7, validator=_fraction, metadata={
        "doc": "A category is flagged when its best score reaches this (0-1)."})
    category_thresholds: dict[str, float] = attrs.field(factory=dict, validator=_fractions, metadata={
        "doc": "Per-category thresholds, e.g. `{profanity: 0.3, pii: 0.9}`."})
    rules: tuple[Rule, ...] = attrs.field(default=(), metadata={"doc": "Inline rules."})
    rule_files: tuple[str, ...] = attrs.field(default=(), metadata={
        "doc": "YAML rule files, relative to the working directory; loaded at startup."})
    jailbreak_detection: bool = attrs.field(default=True, metadata={
        "doc": "Add the built-in jailbreak patterns (category `jailbreak`, input only)."})
    check_input: bool = attrs.field(default=True, metadata={"doc": "Scan requests."})
    check_output: bool = attrs.field(default=True, metadata={"doc": "Scan answers."})
    input_roles: tuple[str, ...] = attrs.field(default=("user",), metadata={
        "doc": "Message roles scanned; add `tool` to catch injections in tool results."})
    endpoints: tuple[str, ...] = attrs.field(default=("chat.completions", "completions"), validator=_endpoints,
                                             metadata={"doc": "Endpoints moderated; `embeddings` may be added "
                                                              "(input only, error mode)."})
    refusal_mode: str = attrs.field(default="error", validator=one_of("error", "refusal", plugin="moderation"), metadata={
        "doc": "How a flagged request is answered: `error` (400 `content_policy_violation`) or `refusal` (an "
               "assistant answer with `finish_reason: content_filter`)."})
    refusal_message: str = attrs.field(default="I can't help with that request.", metadata={
        "doc": "The assistant text in `refusal` mode."})
    holdback_chars: int | None = attrs.field(default=None, validator=_not_negative, metadata={
        "doc": "Characters of a stream held back before release. Null: the longest possible match minus one; "
               "0: scan without holding back."})
    max_match_chars: int = attrs.field(default=256, validator=_positive, metadata={
        "doc": "Length assumed for regular expressions with unbounded repeats (`*`, `+`)."})
    reload_interval: float | None = attrs.field(default=None, validator=_positive, metadata={
        "doc": "Seconds between polls of `rule_files` for changes; null: rules change with a config reload."})
    external: ExternalCheckConfig | None = attrs.field(default=None, metadata={
        "doc": "An OpenAI-compatible `/v1/moderations` service asked when the local rules flag nothing."})


@attrs.define
class ModerationStats:
    """Counters of one moderation plugin instance (a later metrics plugin exports them)."""

    input_checked: int = 0
    input_flagged: int = 0
    output_flagged: int = 0
    external_calls: int = 0
    external_errors: int = 0
    reloads: int = 0
    reload_errors: int = 0
    by_category: dict[str, int] = attrs.field(factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


class _Text:
    """The scanned text of one choice of a stream: a short tail of it, and how much there was in all."""

    __slots__ = ("buf", "total", "done")

    def __init__(self) -> None:
        self.buf = ""
        self.total = 0
        self.done = False


class ModerationState:
    """Per-exchange state (``exchange.state[ModerationState]``): the rules the request started with, what was
    flagged, and for a stream the text tails and the held-back chunks."""

    __slots__ = ("rules", "matcher", "detectors", "holdback", "overlap", "keep", "texts", "held", "flagged",
                 "direction", "attempt", "reasoning")

    def __init__(self, rules: RuleSet, check_output: bool, holdback: int | None) -> None:
        self.rules = rules
        matcher = rules.output
        self.matcher = matcher if check_output and not matcher.empty else None
        self.detectors = matcher.detectors
        self.overlap = max(0, matcher.max_len - 1)
        self.holdback = self.overlap if holdback is None else holdback
        self.keep = self.overlap + _CONTEXT
        #: Text tails by choice index; a choice's reasoning (``reasoning_content``) has its own, at ``-1 - index``.
        self.texts: dict[int, _Text] = {}
        self.reasoning = False  #: whether any choice streamed reasoning (its tail must end when content starts)
        self.held: list[tuple[Chunk, Any, int]] = []  #: (chunk, _Text or _Needs or None, end offset)
        self.flagged: dict[str, float] | None = None  #: category -> score, once something was flagged
        self.direction: str | None = None  #: "input" or "output"
        self.attempt = 0  #: ``len(exchange.attempts)`` at the last chunk


class _Needs:
    """The release condition of a chunk carrying text for several choices (rare): ready when each is."""

    __slots__ = ("needs", "holdback")
    total = 0  # with end 1 below, the generic test is False: only ``done`` decides

    def __init__(self, needs: list[tuple[_Text, int]], holdback: int) -> None:
        self.needs, self.holdback = needs, holdback

    @property
    def done(self) -> bool:
        return all(t.done or t.total - self.holdback >= e for t, e in self.needs)


#: The usual streamed content chunk, compact and single-choice, with an escape-free string: its text is taken
#: from the bytes, without a JSON parse. Anchored on ``"choices":[{`` and ``}]``, so exactly one choice; the
#: quotes of these markers cannot occur inside JSON strings (there every quote is escaped). Any other chunk
#: (other key order, spaces, escapes, finish_reason set, several choices) takes the parsing path.
_CONTENT_CHUNK = re.compile(rb'"choices":\[\{"index":(\d+),"delta":\{"content":"([^"\\]*)"\}'
                            rb'(?:,"logprobs":null)?,"finish_reason":null\}\]')


def _and(need: Any, more: tuple[_Text, int]) -> Any:
    """A chunk's release condition with one more (tail, end) to wait for."""
    if need is None:
        return more
    return (need if type(need) is list else [need]) + [more]


def _reasoning_over(st: ModerationState, idx: int) -> None:
    """The answer of choice ``idx`` started or ended: its reasoning is complete, its held chunks may go."""
    own = st.texts.get(-1 - idx)
    if own is not None:
        own.done = True


class ModerationPlugin:
    """The built-in ``moderation`` plugin (``pipeline: [{moderation: {...}}, ...]``)."""

    Config = ModerationConfig

    def __init__(self, config: ModerationConfig | None = None) -> None:
        self.config = config or ModerationConfig()
        self.stats = ModerationStats()
        self._endpoints = frozenset(self.config.endpoints)
        self._roles = frozenset(self.config.input_roles)
        self._session: Any = None
        self._watcher: asyncio.Task[None] | None = None
        self._failed_mtimes: tuple[float | None, ...] | None = None
        #: Why the rule files last failed to reload (None: the rules on disk are the rules in use).
        self.reload_error: str | None = None
        #: The compiled rules in use. Replaced, never mutated: a reload is one assignment.
        self.rules: RuleSet = self._compile()

    def _compile(self) -> RuleSet:
        c = self.config
        return compile_rules(c.rules, c.rule_files, c.jailbreak_detection, c.max_match_chars, now=time.time())

    # -- lifecycle ------------------------------------------------------------------------------------------
    @hookimpl
    async def startup(self, gateway: "Gateway") -> None:
        state = getattr(gateway, "process_state", None)  # counters survive config reloads
        if state is not None:
            self.stats = state.setdefault("moderation.stats", self.stats)
        if self.config.external is not None and self._session is None:
            import aiohttp

            self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        if self.config.reload_interval and self.rules.files and self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(self.config.reload_interval))

    @hookimpl
    async def shutdown(self, gateway: "Gateway") -> None:
        watcher, self._watcher = self._watcher, None
        await stop_task(watcher)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def reload(self) -> RuleSet:
        """Re-read the rule files and swap the compiled rules in; on any problem keep the old ones and raise.

        Requests in flight keep the rules they started with.
        """
        try:
            new = self._compile()
        except (ConfigError, ValueError) as exc:
            self.stats.reload_errors += 1
            self.reload_error = str(exc)
            log.error("moderation_reload_failed", error=str(exc), files=list(self.config.rule_files))
            raise
        self.rules = new
        self.reload_error = None
        self.stats.reloads += 1
        log.info("moderation_rules_reloaded", files=list(new.files), input_rules=len(new.input.rules),
                 output_rules=len(new.output.rules))
        return new

    def health(self) -> dict[str, Any]:
        """``degraded`` while the rule files on disk failed to load (the rules before them still apply)."""
        if self.reload_error is None:
            return {"status": "ok", "reloads": self.stats.reloads}
        return {"status": "degraded", "error": self.reload_error,
                "detail": "the rule files on disk do not load; the rules loaded before still apply"}

    async def _watch(self, interval: float) -> None:
        """Reload when a rule file's modification time changes (a failed version is not retried)."""
        while True:
            await asyncio.sleep(interval)
            current = tuple(mtime(f) for f in self.rules.files)
            if current != self.rules.mtimes and current != self._failed_mtimes:
                try:
                    self.reload()
                    self._failed_mtimes = None
                except (ConfigError, ValueError):
                    self._failed_mtimes = current

    # -- scoring --------------------------------------------------------------------------------------------
    def _threshold(self, category: str) -> float:
        return self.config.category_thresholds.get(category, self.config.threshold)

    def _flagged(self, hits: list[Hit]) -> dict[str, float]:
        """category -> best score, for the categories whose best score reaches their threshold."""
        best: dict[str, float] = {}
        for hit in hits:
            if hit.score > best.get(hit.category, -1.0):
                best[hit.category] = hit.score
        return {c: s for c, s in best.items() if s >= self._threshold(c)}

    def _violation(self, exchange: "Exchange", direction: str, flagged: dict[str, float],
                   rules: list[str] | None = None) -> None:
        st = exchange.state.get(ModerationState)
        if st is not None:
            st.flagged, st.direction = flagged, direction
        tags = getattr(exchange, "tags", None)  # labels for the access log and metrics plugins
        if tags is not None:
            tags.add("moderation_flagged")
        stats = self.stats
        if direction == "input":
            stats.input_flagged += 1
        else:
            stats.output_flagged += 1
        for category in flagged:
            stats.by_category[category] = stats.by_category.get(category, 0) + 1
        # The matched text is never logged: it is the content the policy exists to keep out.
        log.warning("moderation_flagged", request_id=exchange.request_id, direction=direction,
                    categories=sorted(flagged), scores=flagged, rules=sorted(set(rules or ())),
                    model=exchange.model)

    # -- input ----------------------------------------------------------------------------------------------
    def _state(self, exchange: "Exchange") -> ModerationState:
        st = ModerationState(self.rules, self.config.check_output and exchange.endpoint in self._endpoints,
                             self.config.holdback_chars)
        exchange.state[ModerationState] = st
        return st

    def _input_texts(self, exchange: "Exchange") -> list[str]:
        body = exchange.json
        texts: list[str] = []
        if exchange.endpoint == "chat.completions":
            roles = self._roles
            for message in body.get("messages") or ():
                if not isinstance(message, dict) or message.get("role") not in roles:
                    continue
                content = message.get("content")
                if isinstance(content, str):
                    texts.append(content)
                elif isinstance(content, list):
                    for part in content:
                        if isinstance(part, dict) and isinstance(part.get("text"), str):
                            texts.append(part["text"])
        else:
            value = body.get("prompt") if exchange.endpoint == "completions" else body.get("input")
            if isinstance(value, str):
                texts.append(value)
            elif isinstance(value, list):
                texts.extend(v for v in value if isinstance(v, str))
        return [t for t in texts if t]

    @hookimpl
    async def check_request(self, exchange: "Exchange") -> Reply | None:
        if exchange.endpoint not in self._endpoints:
            return None
        st = self._state(exchange)
        if not self.config.check_input:
            return None
        self.stats.input_checked += 1
        texts = self._input_texts(exchange)
        matcher = st.rules.input
        hits: list[Hit] = []
        if not matcher.empty:
            for text in texts:
                found = matcher.scan(normalize(text))
                if found:
                    hits.extend(found)
        flagged = self._flagged(hits) if hits else {}
        rules = [h.rule for h in hits if h.category in flagged]
        if not flagged and self.config.external is not None and texts:
            flagged = await self._external_check(texts)
            rules = ["external"] if flagged else []
        if not flagged:
            return None
        self._violation(exchange, "input", flagged, rules)
        return self._refuse(exchange, sorted(flagged))

    async def _external_check(self, texts: list[str]) -> dict[str, float]:
        cfg = self.config.external
        assert cfg is not None
        budget = cfg.max_chars
        sent: list[str] = []
        for text in reversed(texts):  # the most recent text first, within max_chars
            if budget <= 0:
                break
            sent.append(text[-budget:])
            budget -= len(text)
        sent.reverse()
        payload: dict[str, Any] = {"input": sent}
        if cfg.model:
            payload["model"] = cfg.model
        headers = {"Content-Type": "application/json"}
        key = cfg.api_key or (os.environ.get(cfg.api_key_env) if cfg.api_key_env else None)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self.stats.external_calls += 1
        try:
            import aiohttp

            if self._session is None:
                self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
            async with self._session.post(cfg.url, data=orjson.dumps(payload), headers=headers,
                                          timeout=aiohttp.ClientTimeout(total=cfg.timeout)) as resp:
                raw = await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")
            results = orjson.loads(raw)["results"]
            if not isinstance(results, list):
                raise TypeError("'results' is not a list")
        except Exception as exc:  # noqa: BLE001 - timeouts, refusals, bad JSON: every failure alike
            self.stats.external_errors += 1
            log.warning("moderation_external_failed", url=cfg.url, error=repr(exc), on_error=cfg.on_error)
            if cfg.on_error == "allow":
                return {}
            raise GatewayError(503, "The content moderation service is unavailable; please retry later.",
                               type="service_unavailable", code="moderation_unavailable") from None
        flagged: dict[str, float] = {}
        for result in results:
            if not isinstance(result, dict):
                continue
            scores = result.get("category_scores") or {}
            for category, score in scores.items():
                if isinstance(score, (int, float)) and score >= self._threshold(category):
                    flagged[category] = max(float(score), flagged.get(category, 0.0))
            if cfg.use_flagged and result.get("flagged") and not flagged:
                marked = [c for c, on in (result.get("categories") or {}).items() if on] or ["flagged"]
                for category in marked:
                    flagged[category] = float(scores.get(category) or 1.0)
        return flagged

    def _refuse(self, exchange: "Exchange", categories: list[str]) -> Reply:
        endpoint = exchange.endpoint
        if self.config.refusal_mode == "error" or endpoint == "embeddings":
            raise GatewayError(400, "This request was refused by the gateway's content policy (categories: "
                                    f"{', '.join(categories)}).", code="content_policy_violation")
        message = self.config.refusal_message
        created = int(time.time())
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        if endpoint == "chat.completions":
            rid = new_id("chatcmpl")
            base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": exchange.model}
            body = {"id": rid, "object": "chat.completion", "created": created, "model": exchange.model,
                    "choices": [{"index": 0, "logprobs": None, "finish_reason": "content_filter",
                                 "message": {"role": "assistant", "content": message, "refusal": message}}],
                    "usage": usage}
            chunks = [{**base, "choices": [{"index": 0, "logprobs": None, "finish_reason": None,
                                            "delta": {"role": "assistant", "content": message, "refusal": message}}]},
                      {**base, "choices": [{"index": 0, "logprobs": None, "finish_reason": "content_filter",
                                            "delta": {}}]}]
        else:
            rid = new_id("cmpl")
            base = {"id": rid, "object": "text_completion", "created": created, "model": exchange.model}
            body = {**base, "choices": [{"index": 0, "text": message, "logprobs": None,
                                         "finish_reason": "content_filter"}], "usage": usage}
            chunks = [{**base, "choices": [{"index": 0, "text": message, "logprobs": None, "finish_reason": None}]},
                      {**base, "choices": [{"index": 0, "text": "", "logprobs": None,
                                            "finish_reason": "content_filter"}]}]
        if exchange.include_usage:
            chunks.append({**base, "choices": [], "usage": usage})
        return Reply(body=body, chunks=chunks)

    # -- output ---------------------------------------------------------------------------------------------
    @hookimpl
    def on_chunk(self, exchange: "Exchange", chunk: Chunk) -> list[Chunk] | None:
        st = exchange.state.get(ModerationState)
        if st is None:  # an answer no check_request of ours saw (another plugin's reply): scan it all the same
            st = self._state(exchange)
        if st.matcher is None:
            return None
        held = st.held
        if len(exchange.attempts) != st.attempt:
            st.attempt = len(exchange.attempts)
            if exchange.chunks_sent == 0:  # a retry or fallback: the failed attempt's text never reached the client
                held.clear()
                st.texts.clear()
        raw = chunk.raw
        holdback = st.holdback
        m = _CONTENT_CHUNK.search(raw)
        if m is not None and raw[:6] == b"data: ":
            index, content = m.group(1, 2)
            if not content:
                if not held:
                    return None
                held.append((chunk, None, 0))
            else:
                idx = 0 if index == b"0" else int(index)
                if st.reasoning:
                    _reasoning_over(st, idx)
                tail = st.texts.get(idx)
                if tail is None:
                    tail = st.texts[idx] = _Text()
                # _feed, inlined: this is the path of nearly every chunk
                text = content.decode()
                text = text.lower() if text.isascii() else normalize(text)
                buf = tail.buf
                start = len(buf) - st.overlap
                buf += text
                tail.total += len(text)
                if start < 0:
                    start = 0
                for detector in st.detectors:  # Matcher.scan, inlined: clean text stops here
                    if detector.search(buf, start) is not None:
                        hits = st.matcher.collect(buf, start)  # type: ignore[union-attr]
                        if hits:
                            self._check_hits(exchange, st, hits)
                        break
                if len(buf) > st.keep + st.keep + 64:
                    buf = buf[-st.keep:]
                tail.buf = buf
                if holdback == 0:
                    return None
                held.append((chunk, tail, tail.total))
        else:
            if raw == DONE or (raw.endswith(b"[DONE]") and chunk.is_done):
                if held:
                    out = [item[0] for item in held]
                    held.clear()
                    out.append(chunk)
                    return out
                return None
            need = self._parse_and_feed(exchange, st, chunk)
            if holdback == 0 or (need is None and not held):
                return None
            if need is None:
                held.append((chunk, None, 0))
            elif type(need) is tuple:
                held.append((chunk, need[0], need[1]))
            else:
                held.append((chunk, _Needs(need, holdback), 1))
        released = 0
        for _, tail, end in held:
            if tail is not None and not (tail.done or tail.total - holdback >= end):
                break
            released += 1
        if released == 0:
            return []
        if released == len(held):
            out = [item[0] for item in held]
            held.clear()
            return out
        out = [item[0] for item in held[:released]]
        del held[:released]
        return out

    def _parse_and_feed(self, exchange: "Exchange", st: ModerationState, chunk: Chunk) -> Any:
        """Any other event: parsed; each choice's text scanned; finished choices marked. Returns the release
        condition: None (no text), (tail, end), or a list of them (text for several choices)."""
        raw = chunk.raw
        if raw[:6] == b"data: " and b"\n" not in raw:  # a one-line event: parse it straight from the bytes
            try:
                data = _loads(raw[6:])
            except _JSONDecodeError:
                data = None
        else:
            data = chunk.json
        choices = data.get("choices") if type(data) is dict else None
        need: Any = None
        if choices:
            texts = st.texts
            for choice in choices:
                if type(choice) is not dict:
                    continue
                delta = choice.get("delta")
                text = delta.get("content") if type(delta) is dict else choice.get("text")
                idx = choice.get("index", 0)
                if type(idx) is not int:
                    idx = 0
                if type(delta) is dict:
                    # A reasoning model's thinking is output too: scanned apart from the answer (no match across
                    # the two), and held back like it.
                    reasoning = reasoning_of(delta)
                    if reasoning is not None:
                        st.reasoning = True
                        own = texts.get(-1 - idx)
                        if own is None:
                            own = texts[-1 - idx] = _Text()
                        self._feed(exchange, st, own, reasoning)
                        need = _and(need, (own, own.total))
                tail = texts.get(idx)
                if tail is None:
                    tail = texts[idx] = _Text()
                if text and type(text) is str:
                    if st.reasoning:
                        _reasoning_over(st, idx)
                    self._feed(exchange, st, tail, text)
                    need = _and(need, (tail, tail.total))
                if choice.get("finish_reason"):
                    tail.done = True
                    if st.reasoning:
                        _reasoning_over(st, idx)
        return need

    def _feed(self, exchange: "Exchange", st: ModerationState, tail: _Text, text: str) -> None:
        """Scan the new text of one choice with the overlap before it; raise StopStream on a violation."""
        text = text.lower() if text.isascii() else normalize(text)
        buf = tail.buf
        start = len(buf) - st.overlap
        buf += text
        tail.total += len(text)
        hits = st.matcher.scan(buf, start if start > 0 else 0)  # type: ignore[union-attr]
        if len(buf) > st.keep + st.keep + 64:
            buf = buf[-st.keep:]
        tail.buf = buf
        if hits:
            self._check_hits(exchange, st, hits)

    def _check_hits(self, exchange: "Exchange", st: ModerationState, hits: list[Hit]) -> None:
        flagged = self._flagged(hits)
        if flagged:
            st.held.clear()
            self._violation(exchange, "output", flagged, [h.rule for h in hits if h.category in flagged])
            raise StopStream("moderation: " + ", ".join(sorted(flagged)), finish_reason="content_filter")

    @hookimpl
    def on_response(self, exchange: "Exchange", body: Any) -> None:
        if not self.config.check_output or exchange.endpoint not in self._endpoints or type(body) is not dict:
            return None
        st = exchange.state.get(ModerationState) or self._state(exchange)
        matcher = st.rules.output
        if matcher.empty:
            return None
        hits: list[Hit] = []
        for choice in body.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            message = choice.get("message")
            texts = [choice.get("text")]
            if isinstance(message, dict):  # the answer, and a reasoning model's thinking apart
                texts = [message.get("content"), reasoning_of(message)]
            for text in texts:
                if isinstance(text, str) and text:
                    found = matcher.scan(normalize(text))
                    if found:
                        hits.extend(found)
        flagged = self._flagged(hits) if hits else None
        if flagged:
            self._violation(exchange, "output", flagged, [h.rule for h in hits if h.category in flagged])
            raise StopStream("moderation: " + ", ".join(sorted(flagged)), finish_reason="content_filter")
        return None

