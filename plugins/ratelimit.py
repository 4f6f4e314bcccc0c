"""The ``ratelimit`` plugin: requests and tokens per minute, per key (and optionally per model), in memory or
shared through Redis with the same arithmetic.

``check_request`` resolves the caller's limits (the key's own ``rpm``/``tpm``/bursts, else its tier, else
``default_tier``; anonymous callers get ``anonymous`` per client IP, or no limit), estimates the request's
tokens (prompt estimate + ``max_tokens`` or ``default_max_tokens``) and, in one atomic backend call, takes one
request and reserves the tokens from the caller's buckets, or refuses with 429 before anything reaches an
upstream. ``exchange_done`` reconciles the reservation with the real usage (streams, errors and client
disconnects included). Every limited response carries OpenAI's ``x-ratelimit-*`` headers.

The algorithm and the fleet-exactness argument: ``plugins/_ratelimit_core.py`` and ``docs/auth-and-limits.md``.
"""
from __future__ import annotations

import asyncio
import functools
import ipaddress
import hashlib
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import attrs
import structlog

from proxy.tasks import stop_task
from proxy import GatewayError, Outcome, hookimpl
from proxy.tokens import estimate_prompt_tokens, requested_completion_tokens

from ._keys import MAX_LIMIT
from ._ratelimit_core import UNIT, BackendError, MemoryBackend, RedisBackend, format_duration
from ._validators import one_of

if TYPE_CHECKING:
    from proxy import Exchange, Principal
    from proxy.gateway import Gateway

__all__ = ["RateLimitPlugin", "RateLimitConfig", "LimitsConfig", "Limits", "TIERS"]

log = structlog.get_logger("ssegate.ratelimit")

BACKENDS = ("memory", "redis")
ON_BACKEND_ERROR = ("fail_closed", "fail_open")
_MAX_CACHED_PLANS = 8192


def _limit(_: Any, attribute: attrs.Attribute, value: int | None) -> None:  # type: ignore[type-arg]
    if value is not None and not 1 <= value <= MAX_LIMIT:
        raise ValueError(f"{attribute.name} must be between 1 and {MAX_LIMIT:_}; got {value!r}")


def _positive(_: Any, attribute: attrs.Attribute, value: float) -> None:  # type: ignore[type-arg]
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive; got {value!r}")


@attrs.frozen
class LimitsConfig:
    """One set of limits (a tier, the anonymous limits). Unset means "no limit" on that dimension."""

    rpm: int | None = attrs.field(default=None, validator=_limit, metadata={"doc": "Requests per minute."})
    tpm: int | None = attrs.field(default=None, validator=_limit, metadata={"doc": "Tokens per minute."})
    rpm_burst: int | None = attrs.field(
        default=None, validator=_limit, metadata={"doc": "Requests that may be made at once (default: rpm)."})
    tpm_burst: int | None = attrs.field(
        default=None, validator=_limit, metadata={"doc": "Tokens that may be spent at once (default: tpm)."})


@attrs.frozen
class Limits:
    """Effective limits, bursts resolved. ``None`` rate: that dimension is not limited."""

    rpm: int | None = None
    tpm: int | None = None
    rpm_burst: int | None = None
    tpm_burst: int | None = None

    @classmethod
    def of(cls, rpm: int | None, tpm: int | None, rpm_burst: int | None = None,
           tpm_burst: int | None = None) -> "Limits":
        return cls(rpm, tpm, (rpm_burst or rpm) if rpm else None, (tpm_burst or tpm) if tpm else None)


#: Built-in tiers (`tier-3` is the seed's "100 RPM, 10K TPM"); the config's `tiers:` adds or replaces tiers.
TIERS: dict[str, Limits] = {
    "tier-1": Limits.of(rpm=20, tpm=2_000),
    "tier-2": Limits.of(rpm=50, tpm=5_000),
    "tier-3": Limits.of(rpm=100, tpm=10_000),
    "tier-4": Limits.of(rpm=500, tpm=50_000),
    "tier-5": Limits.of(rpm=2_000, tpm=200_000),
}


@attrs.frozen
class RateLimitConfig:
    backend: str = attrs.field(default="memory", validator=one_of(*BACKENDS), metadata={
        "doc": "`memory` (this process only) or `redis` (shared by every replica; needs `redis.url`)."})
    default_tier: str | None = attrs.field(default="tier-3", metadata={
        "doc": "Tier of keys that name no tier, applied per limit: its rpm and tpm apply where the key sets none; "
               "null: such keys are limited only by their own rpm/tpm, if any."})
    tiers: dict[str, LimitsConfig] = attrs.field(factory=dict, metadata={
        "doc": "Extra tiers, or replacements of the built-in `tier-1` ... `tier-5`."})
    anonymous: LimitsConfig | None = attrs.field(default=None, metadata={
        "doc": "Limits per client IP for requests without a principal; null: not limited."})
    per_model: bool = attrs.field(default=False, metadata={
        "doc": "Separate buckets for each (key, model) pair instead of one per key."})
    default_max_tokens: int = attrs.field(default=1024, validator=_limit, metadata={
        "doc": "Completion tokens reserved when a request sets no max_tokens."})
    on_backend_error: str = attrs.field(default="fail_closed", validator=one_of(*ON_BACKEND_ERROR), metadata={
        "doc": "Backend unreachable: `fail_closed` (503) or `fail_open` (requests pass unlimited)."})
    backend_retry_interval: float = attrs.field(default=0.5, validator=_positive, metadata={
        "doc": "Seconds between attempts to reach a failed backend (requests meanwhile get the fail mode)."})
    key_prefix: str = attrs.field(default="ssegate:rl:", metadata={"doc": "Prefix of the Redis keys."})
    headers: bool = attrs.field(default=True, metadata={"doc": "Send the x-ratelimit-* headers."})


class _Plan:
    """What one subject's requests are checked against: bucket keys, capacities and rates, resolved once."""

    __slots__ = ("name", "limits", "tier", "custom", "keys", "caps", "rates", "token_index")

    def __init__(self, name: str, subject: str, limits: Limits, prefix: str, tier: Any, custom: Any) -> None:
        self.name, self.limits, self.tier, self.custom = name, limits, tier, custom
        keys, caps, rates = [], [], []
        if limits.rpm:
            keys.append(f"{prefix}{{{subject}}}:r")
            caps.append(limits.rpm_burst * UNIT)  # type: ignore[operator]
            rates.append(limits.rpm)
        self.token_index = len(keys) if limits.tpm else -1
        if limits.tpm:
            keys.append(f"{prefix}{{{subject}}}:t")
            caps.append(limits.tpm_burst * UNIT)  # type: ignore[operator]
            rates.append(limits.tpm)
        self.keys, self.caps, self.rates = tuple(keys), tuple(caps), tuple(rates)


@functools.lru_cache(maxsize=4096)
def _client_block(address: str | None) -> str:
    """The unit anonymous limits count by: an IPv4 address, or the /64 of an IPv6 one (a host is usually given a
    whole /64, and could otherwise spread its requests over as many addresses as it likes)."""
    if not address:
        return "unknown"
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:  # an IPv4 client of a dual-stack listener: its own address
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))


class _Reservation:
    """Per-exchange state: what was reserved, to reconcile in exchange_done."""

    __slots__ = ("plan", "reserved", "prompt")

    def __init__(self) -> None:
        self.plan: _Plan | None = None
        self.reserved = 0
        self.prompt = 0


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class RateLimitPlugin:
    Config = RateLimitConfig

    def __init__(self, config: RateLimitConfig | None = None) -> None:
        self.config = config = config or RateLimitConfig()
        self.tiers: dict[str, Limits] = dict(TIERS)
        for name, tier in config.tiers.items():
            self.tiers[name] = Limits.of(tier.rpm, tier.tpm, tier.rpm_burst, tier.tpm_burst)
        if config.default_tier is not None and config.default_tier not in self.tiers:
            raise ValueError(f"default_tier {config.default_tier!r} is not a tier "
                             f"(known: {', '.join(sorted(self.tiers))})")
        self.default = self.tiers[config.default_tier] if config.default_tier else None
        a = config.anonymous
        self.anonymous = Limits.of(a.rpm, a.tpm, a.rpm_burst, a.tpm_burst) if a is not None else None
        self.backend: MemoryBackend | RedisBackend = MemoryBackend() if config.backend == "memory" else RedisBackend()
        self._memory = self.backend if isinstance(self.backend, MemoryBackend) else None
        self._plans: dict[tuple[str, str | None], _Plan] = {}
        self._aliases: dict[str, tuple[str, ...]] = {}  # the router's (set at startup)
        self._provider_names: frozenset[str] = frozenset()
        self._fail_open = config.on_backend_error == "fail_open"
        # backend health
        self._failing = False
        self._retry_at = 0.0
        self._failing_since: float | None = None
        self.last_error: str | None = None
        self.backend_failures = 0
        self._probe: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()

    # -- lifecycle ----------------------------------------------------------------------------------------
    @hookimpl
    async def startup(self, gateway: "Gateway") -> None:
        try:  # per_model buckets are keyed by the model served, whatever name the request used for it
            aliases = getattr(gateway.plugin_config("router"), "aliases", None)
        except KeyError:
            aliases = None
        self._aliases = dict(aliases) if isinstance(aliases, dict) else {}
        self._provider_names = frozenset(gateway.providers)
        if isinstance(self.backend, RedisBackend):
            if not gateway.config.redis.url:
                raise ValueError("the ratelimit backend 'redis' needs the redis.url setting")
            await self.backend.start(gateway)
            try:
                await self.backend.load_script()
            except BackendError as exc:  # start anyway: the backend is retried, and requests get the fail mode
                self._mark_failed(exc)
            self._probe = asyncio.get_running_loop().create_task(self._probe_loop(), name="ssegate-ratelimit-probe")
        else:
            # The buckets outlive config reloads: a reload must not hand every caller a fresh burst.
            shared = gateway.process_state.setdefault("ratelimit.memory", self.backend)
            if shared is not self.backend:
                self.backend = self._memory = shared
            await self.backend.start(gateway)

    @hookimpl
    async def shutdown(self, gateway: "Gateway") -> None:
        probe, self._probe = self._probe, None
        await stop_task(probe)
        if self._pending:
            try:
                await asyncio.wait_for(self.drain(), timeout=5)
            except asyncio.TimeoutError:
                log.warning("rate_limit_reconcile_lost", pending=len(self._pending), reason="shutdown")
        await self.backend.close()

    # -- backend health -----------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """``{"status": "ok" | "degraded" | "failing", "backend", "on_backend_error", "error", ...}``.

        ``degraded``: the backend is unreachable and requests pass unlimited (fail_open); ``failing``: it is
        unreachable and limited requests are refused with 503 (fail_closed).
        """
        status = "ok"
        if self._failing:
            status = "degraded" if self._fail_open else "failing"
        since = None
        if self._failing_since is not None:
            since = datetime.fromtimestamp(self._failing_since, timezone.utc).isoformat()
        return {"status": status, "backend": self.backend.name, "on_backend_error": self.config.on_backend_error,
                "error": self.last_error if self._failing else None, "since": since,
                "failures": self.backend_failures}

    def _mark_failed(self, exc: BaseException) -> None:
        self.backend_failures += 1
        self.last_error = str(exc)
        self._retry_at = time.monotonic() + self.config.backend_retry_interval
        if not self._failing:
            self._failing = True
            self._failing_since = time.time()
            log.error("rate_limit_backend_failed", backend=self.backend.name, error=str(exc),
                      on_backend_error=self.config.on_backend_error)

    def _mark_ok(self) -> None:
        if self._failing:
            self._failing = False
            down = time.time() - (self._failing_since or time.time())
            self._failing_since = None
            log.info("rate_limit_backend_recovered", backend=self.backend.name, down_seconds=round(down, 3))

    async def _probe_loop(self) -> None:
        """While the backend is failing, probe it so health recovers even without traffic."""
        interval = self.config.backend_retry_interval
        while True:
            await asyncio.sleep(interval)
            if not self._failing or time.monotonic() < self._retry_at:
                continue
            try:
                await self.backend.load_script()
            except BackendError as exc:
                self.last_error = str(exc)
                self._retry_at = time.monotonic() + interval
                continue
            self._mark_ok()

    def _backend_unavailable(self) -> None:
        if self._fail_open:
            return None
        raise GatewayError(
            503, f"Rate limiting is unavailable: its {self.backend.name} backend cannot be reached, so the "
                 "request was not forwarded. Please retry shortly.",
            code="rate_limit_backend_unavailable", headers={"Retry-After": "1"})

    # -- limits -------------------------------------------------------------------------------------------
    def limits_for(self, principal: "Principal | None") -> Limits | None:
        """The effective limits of a caller (None: not limited)."""
        if principal is None:
            return self.anonymous
        custom = principal.metadata.get("limits") or {}
        tier = principal.tier
        if tier is not None:
            base = self.tiers.get(tier)
            if base is None:
                log.error("rate_limit_unknown_tier", tier=tier, key=principal.name)
                raise GatewayError(500, f"The rate-limit tier {tier!r} of key {principal.name!r} is not "
                                        "configured.", code="unknown_rate_limit_tier")
        else:
            base = self.default
        if base is None and not custom:
            return None
        base = base or Limits()

        def pick(rate: str, burst: str) -> tuple[int | None, int | None]:
            if rate in custom:
                return custom[rate], custom.get(burst) or custom[rate]
            value = getattr(base, rate)
            return value, (custom.get(burst) or getattr(base, burst)) if value else None

        rpm, rpm_burst = pick("rpm", "rpm_burst")
        tpm, tpm_burst = pick("tpm", "tpm_burst")
        if not rpm and not tpm:
            return None
        return Limits(rpm, tpm, rpm_burst, tpm_burst)

    def bucket_model(self, model: str | None) -> str | None:
        """The model whose buckets a request uses with ``per_model``: a router alias counts as its first target,
        and ``provider/model`` as ``model``, so one model reached under several names shares one set of limits."""
        if model is None:
            return None
        targets = self._aliases.get(model)
        if targets:
            model = targets[0]
        provider, slash, bare = model.partition("/")
        return bare if slash and bare and provider in self._provider_names else model

    def _plan_for(self, exchange: "Exchange") -> _Plan | None:
        principal = exchange.principal
        model = self.bucket_model(exchange.model) if self.config.per_model else None
        if principal is None:
            if self.anonymous is None:
                return None
            subject, tier, custom, name = f"ip:{_client_block(exchange.client_ip)}", None, None, "anonymous"
        else:
            meta = principal.metadata
            subject = meta.get("rate_limit_key") or f"name:{principal.name}"
            tier, custom, name = principal.tier, meta.get("limits"), principal.name
        cache_key = (subject, model)
        plan = self._plans.get(cache_key)
        if plan is not None and plan.tier == tier and plan.custom is custom:
            return plan if plan.keys else None
        limits = self.limits_for(principal) or Limits()
        if model is not None:
            part = model if len(model) <= 64 and "{" not in model and "}" not in model else \
                "h:" + hashlib.sha256(model.encode("utf-8", "surrogatepass")).hexdigest()[:16]
            subject = f"{subject}|{part}"
        plan = _Plan(name, subject, limits, self.config.key_prefix, tier, custom)
        if len(self._plans) >= _MAX_CACHED_PLANS:
            self._plans.clear()
        self._plans[cache_key] = plan
        return plan if plan.keys else None

    # -- requests -----------------------------------------------------------------------------------------
    @hookimpl
    async def check_request(self, exchange: "Exchange") -> None:
        plan = self._plan_for(exchange)
        if plan is None:
            return
        limits = plan.limits
        prompt = reserved = 0
        if limits.tpm:
            body = exchange.json
            prompt = estimate_prompt_tokens(exchange.endpoint, body)
            reserved = prompt + requested_completion_tokens(exchange.endpoint, body, self.config.default_max_tokens)
            if reserved > limits.tpm_burst:  # type: ignore[operator]
                exchange.tags.add("ratelimited")
                raise GatewayError(
                    429, f"Request too large for {exchange.model} for key '{plan.name}' on tokens per min (TPM): "
                         f"Limit {limits.tpm}, Requested {reserved}. The input or output tokens must be reduced "
                         "in order to run successfully.", type="tokens", code="rate_limit_exceeded")
            costs: tuple[int, ...] = (UNIT, reserved * UNIT) if limits.rpm else (reserved * UNIT,)
        else:
            costs = (UNIT,)
        if self._failing and time.monotonic() < self._retry_at:
            return self._backend_unavailable()
        try:
            if self._memory is not None:
                ok, _, levels = self._memory.run(plan.keys, plan.caps, plan.rates, costs, True)
            else:
                ok, _, levels = await self.backend.acquire(plan.keys, plan.caps, plan.rates, costs)
        except BackendError as exc:
            self._mark_failed(exc)
            return self._backend_unavailable()
        if self._failing:
            self._mark_ok()
        if self.config.headers:
            self._headers(exchange.response_headers, plan, levels)
        if not ok:
            raise self._refusal(exchange, plan, levels, costs, reserved)
        state = exchange.state_of(_Reservation)
        state.plan, state.reserved, state.prompt = plan, reserved, prompt
        return None

    @staticmethod
    def _headers(headers: dict[str, str], plan: _Plan, levels: list[int]) -> None:
        limits = plan.limits
        i = 0
        if limits.rpm:
            level = levels[0]
            headers["x-ratelimit-limit-requests"] = str(limits.rpm)
            headers["x-ratelimit-remaining-requests"] = str(max(0, level // UNIT))
            headers["x-ratelimit-reset-requests"] = format_duration(_ceil_div(plan.caps[0] - level, limits.rpm))
            i = 1
        if limits.tpm:
            level = levels[i]
            headers["x-ratelimit-limit-tokens"] = str(limits.tpm)
            headers["x-ratelimit-remaining-tokens"] = str(max(0, level // UNIT))
            headers["x-ratelimit-reset-tokens"] = format_duration(_ceil_div(plan.caps[i] - level, limits.tpm))

    def _refusal(self, exchange: "Exchange", plan: _Plan, levels: list[int], costs: tuple[int, ...],
                 reserved: int) -> GatewayError:
        limits = plan.limits
        wait = 0
        kind = None
        for i, (level, cost, rate) in enumerate(zip(levels, costs, plan.rates)):
            if level < cost:
                wait = max(wait, _ceil_div(cost - level, rate))
                if kind is None:
                    kind = "tokens" if i == plan.token_index else "requests"
        if kind == "requests":
            level = levels[0]
            detail = (f"requests per min (RPM): Limit {limits.rpm}, Remaining {max(0, level // UNIT)}, "
                      "Requested 1")
        else:
            level = levels[plan.token_index]
            used = max(0, _ceil_div(plan.caps[plan.token_index] - level, UNIT))
            detail = f"tokens per min (TPM): Limit {limits.tpm}, Used {used}, Requested {reserved}"
        log.debug("rate_limited", key=plan.name, kind=kind, retry_after_ms=wait, request_id=exchange.request_id)
        exchange.tags.add("ratelimited")
        return GatewayError(
            429, f"Rate limit reached for {exchange.model} for key '{plan.name}' on {detail}. "
                 f"Please try again in {format_duration(wait)}.",
            type=kind, code="rate_limit_exceeded",
            headers={"Retry-After": str(max(1, _ceil_div(wait, 1000))), "retry-after-ms": str(wait)})

    # -- reconcile ----------------------------------------------------------------------------------------
    @staticmethod
    def actual_tokens(exchange: "Exchange", prompt_estimate: int, reserved: int | None = None) -> int:
        """Tokens an exchange consumed: nothing for an answer given by a plugin (cache hit, refusal); else the
        upstream's usage; else, if the request reached an upstream and output reached the client (a stream
        without usage, or cut by a disconnect, timeout or error), the prompt estimate plus one token per event
        sent; a whole answer without usage (servers that leave it out), what was reserved for it (``reserved``:
        the prompt estimate and the completion allowance), never nothing; if it reached an upstream and the
        client left or it timed out before any output, the prompt estimate; otherwise (refused later in the
        pipeline, no route, upstream error) nothing."""
        if exchange.outcome == Outcome.SHORT_CIRCUIT:
            return 0
        usage = exchange.usage
        if usage is not None:
            return usage.total_tokens or usage.prompt_tokens + usage.completion_tokens
        if not exchange.attempts:
            return 0
        if exchange.chunks_sent:
            return prompt_estimate + exchange.chunks_sent
        if exchange.outcome in (Outcome.OK, Outcome.STOPPED) and exchange.status < 400:
            return reserved if reserved is not None else prompt_estimate
        if exchange.outcome in (Outcome.CLIENT_DISCONNECT, Outcome.TIMEOUT):
            return prompt_estimate
        return 0

    @hookimpl
    async def exchange_done(self, exchange: "Exchange") -> None:
        state = exchange.state.get(_Reservation)
        if state is None or state.plan is None or state.plan.token_index < 0:
            return
        plan = state.plan
        delta = state.reserved - self.actual_tokens(exchange, state.prompt, state.reserved)
        if delta == 0:
            return
        i = plan.token_index
        args = ((plan.keys[i],), (plan.caps[i],), (plan.rates[i],), (delta * UNIT,))
        if self._memory is not None:
            self._memory.run(*args, False)
            return
        # The reconcile runs as its own task: a client that goes away cancels the request's task (even after
        # the answer was sent, while exchange_done runs), and the refund or extra charge must land regardless.
        task = asyncio.get_running_loop().create_task(self._adjust(plan, delta, args))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            # Cancelled by the client's disconnect: the reconcile goes on in its task. Absorb the cancellation
            # so that the plugins after this one still get their exchange_done (see the docs).
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()

    async def _adjust(self, plan: _Plan, delta: int, args: tuple[Any, ...]) -> None:
        try:
            await self.backend.adjust(*args)
        except BackendError as exc:
            self._mark_failed(exc)
            log.warning("rate_limit_reconcile_lost", key=plan.name, tokens=delta, error=str(exc))

    async def drain(self) -> None:
        """Wait for the reconciles still in flight (shutdown does; tests may)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
