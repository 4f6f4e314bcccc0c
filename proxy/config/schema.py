"""The configuration schema: frozen attrs classes, structured from YAML with cattrs.

Every class documents its keys in ``metadata={"doc": ...}``; the configuration reference is generated from
them. Durations are seconds (floats); sizes are bytes.
"""
from __future__ import annotations

from typing import Any

import attrs

__all__ = [
    "Config",
    "ServerConfig",
    "StreamingConfig",
    "LoggingConfig",
    "ProviderConfig",
    "RedisConfig",
    "CircuitBreakerConfig",
    "ObservabilityConfig",
    "CorsConfig",
    "RetryConfig",
    "SimulationConfig",
    "PipelineEntry",
]


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@attrs.frozen
class ServerConfig:
    host: str = attrs.field(default="127.0.0.1", metadata=_doc("Address to bind."))
    port: int = attrs.field(default=8000, metadata=_doc("TCP port to bind."))
    workers: int = attrs.field(default=1, metadata=_doc("Worker processes sharing the port (SO_REUSEPORT)."))
    tls_cert_file: str | None = attrs.field(
        default=None, metadata=_doc(
            "PEM certificate chain: serve HTTPS (with `tls_key_file`). A reload, or a change of the file that the "
            "config watcher sees, loads it again for new connections. Leave unset behind an ingress or a load "
            "balancer that terminates TLS.")
    )
    tls_key_file: str | None = attrs.field(default=None, metadata=_doc("PEM private key of `tls_cert_file`."))
    max_request_size: int = attrs.field(
        default=10 * 1024 * 1024, metadata=_doc("Largest request body accepted, in bytes; larger gets 413.")
    )
    request_body_timeout: float = attrs.field(
        default=60.0, metadata=_doc(
            "Seconds a client may take to send its request body once its headers arrived; a slower one gets 408 "
            "and its connection is closed (a stalled upload would otherwise hold a request in flight, and a "
            "drain, indefinitely). 0 waits forever.")
    )
    shutdown_grace_seconds: float = attrs.field(
        default=30.0, metadata=_doc("How long in-flight streams may run on after SIGTERM.")
    )
    trusted_proxies: tuple[str, ...] = attrs.field(
        default=(), metadata=_doc("Proxy addresses/CIDRs whose `X-Forwarded-For` is believed.")
    )
    admin_key: str | None = attrs.field(
        default=None, metadata=_doc("Bearer key of the admin API (`POST /admin/reload`); unset disables it. "
                                    "Use `${VAR}`.")
    )
    config_watch_interval: float = attrs.field(
        default=0.0, metadata=_doc(
            "Seconds between checks of the config file and its environment layer; a change reloads the config "
            "as `SIGHUP` does (a Kubernetes ConfigMap volume, updated in place, is seen). 0 turns the watch off.")
    )
    gc_gen0_threshold: int = attrs.field(
        default=10000, metadata=_doc(
            "Python garbage collector: allocations between young-generation collections while serving "
            "(Python's default is 700, which at high request rates spends ~10% of the CPU in the collector; "
            "objects that exist at startup are frozen out of collections too, and the middle generation is "
            "collected every third young collection, to keep its pauses short). 0 keeps Python's defaults.")
    )


@attrs.frozen
class StreamingConfig:
    keepalive: bool = attrs.field(default=True, metadata=_doc("Send `: keepalive` comments on idle streams."))
    keepalive_interval: float = attrs.field(
        default=15.0, metadata=_doc("Seconds of silence after which a keepalive comment is sent.")
    )


@attrs.frozen
class LoggingConfig:
    level: str = attrs.field(
        default="info", metadata=_doc("Root log level: debug, info, warning, error, critical.")
    )
    format: str = attrs.field(
        default="auto", metadata=_doc("`json`, `console`, or `auto` (console on a terminal, JSON otherwise).")
    )
    levels: dict[str, str] = attrs.field(factory=dict, metadata=_doc("Log level per logger name."))


@attrs.frozen
class SimulationConfig:
    """Behaviour of the simulated provider (type `simulated`) and of `ssegate simulate`."""

    ttft_ms: float = attrs.field(default=20.0, metadata=_doc("Mean time to first token, ms."))
    ttft_variance_percent: float = attrs.field(default=10.0, metadata=_doc("Uniform jitter around ttft_ms, %."))
    itl_ms: float = attrs.field(default=5.0, metadata=_doc("Mean inter-token latency, ms."))
    itl_variance_percent: float = attrs.field(default=10.0, metadata=_doc("Uniform jitter around itl_ms, %."))
    response_tokens: int = attrs.field(
        default=32, metadata=_doc("Completion length when the request sets no max_tokens.")
    )
    error_rate: float = attrs.field(default=0.0, metadata=_doc("Probability (0-1) that a request fails."))
    error_status: int = attrs.field(default=500, metadata=_doc("HTTP status of injected errors."))
    models: tuple[str, ...] = attrs.field(
        default=("gpt-4o-mini", "gpt-4o", "gpt-3.5-turbo", "text-embedding-3-small"),
        metadata=_doc("Models the simulator lists and answers for."),
    )
    seed: int | None = attrs.field(default=None, metadata=_doc("Random seed, for reproducible answers."))


@attrs.frozen
class CircuitBreakerConfig:
    """Per-provider circuit breaker (the seed's `circuit_breaker` block)."""

    enabled: bool = attrs.field(default=True, metadata=_doc("Use circuit breakers."))
    failure_threshold: int = attrs.field(
        default=5, metadata=_doc(
            "Consecutive provider faults (connect errors, timeouts, 5xx, a refused key: 401/403, error events, "
            "broken streams) that open a provider's circuit; client errors and 429s do not count.")
    )
    recovery_timeout: float = attrs.field(
        default=60.0, metadata=_doc(
            "Seconds an open circuit skips the provider before trial calls. A 429 with `Retry-After` opens it for "
            "that long instead, at most this.")
    )
    half_open_max_calls: int = attrs.field(
        default=3, metadata=_doc("Trial calls allowed at once while half-open.")
    )


@attrs.frozen
class RetryConfig:
    """Retries before the first byte reached the client (on connect errors, timeouts, 429 and 5xx)."""

    backoff_base: float = attrs.field(default=0.25, metadata=_doc("First backoff, seconds; doubles per retry."))
    backoff_max: float = attrs.field(default=8.0, metadata=_doc("Longest backoff between two attempts, seconds."))
    jitter: bool = attrs.field(default=True, metadata=_doc("Full jitter: sleep a random time up to the backoff."))
    max_retry_after: float = attrs.field(
        default=30.0, metadata=_doc("Longest `Retry-After` honoured; a longer one moves on to the next route.")
    )
    request_deadline: float = attrs.field(
        default=600.0, metadata=_doc("Total seconds for a request across all attempts and fallbacks.")
    )


@attrs.frozen
class RedisConfig:
    """The shared Redis (one connection pool per process) that plugins with a `redis` backend use."""

    url: str | None = attrs.field(
        default=None, metadata=_doc("URL of one Redis server (`redis://`, `rediss://` or `unix://`), e.g. "
                                    "`redis://127.0.0.1:6379/0`, or of the master of a Sentinel group, "
                                    "`redis+sentinel://[:password@]host:26379[,host:26379...]/service[/db]` "
                                    "(`rediss+sentinel://` for TLS; the Sentinels' own password as "
                                    "`?sentinel_password=`). Cluster is not supported. Unset: no Redis.")
    )
    max_connections: int = attrs.field(default=100, metadata=_doc("Pool size per process."))
    socket_timeout: float = attrs.field(default=1.0, metadata=_doc("Seconds to wait for a Redis reply."))
    connect_timeout: float = attrs.field(default=1.0, metadata=_doc("Seconds to connect to Redis."))


@attrs.frozen
class ObservabilityConfig:
    """Metrics, access log and health."""

    metrics: bool = attrs.field(default=True, metadata=_doc("Serve Prometheus metrics on `/metrics`."))
    metrics_port: int | None = attrs.field(
        default=None, metadata=_doc("Also serve `/metrics` on this port (e.g. 9090), on `server.host`.")
    )
    access_log: bool = attrs.field(default=True, metadata=_doc("One access log line per exchange."))
    log_prompts: bool = attrs.field(
        default=False, metadata=_doc("Include prompt text in access lines (off: never logged).")
    )
    summary_window: int = attrs.field(
        default=10000, metadata=_doc("Recent exchanges kept for `/metrics/summary` percentiles.")
    )
    loop_lag_threshold: float = attrs.field(
        default=1.0, metadata=_doc("Event-loop lag (seconds) above which liveness fails.")
    )
    ready_requires_providers: bool = attrs.field(
        default=True, metadata=_doc(
            "Readiness fails while every enabled provider's circuit is open. Every replica sees the same upstreams, "
            "so with one upstream all replicas leave the Service together; false keeps them in, answering the "
            "gateway's OpenAI-format 503 `provider_unavailable` instead of the ingress's error page.")
    )
    ready_requires_redis: bool = attrs.field(
        default=False, metadata=_doc(
            "Readiness fails while the configured Redis does not answer. Off by default: a plugin that cannot work "
            "without Redis reports itself failing (the rate limiter with `on_backend_error: fail_closed`), which "
            "fails readiness; with `fail_open`, or for the cache, the replica stays ready.")
    )


@attrs.frozen
class CorsConfig:
    """CORS for browser front ends."""

    allow_origins: tuple[str, ...] = attrs.field(
        default=(), metadata=_doc("Allowed origins (`*` for any); empty disables CORS.")
    )
    allow_credentials: bool = attrs.field(default=False, metadata=_doc("Send `Access-Control-Allow-Credentials`."))
    allow_headers: tuple[str, ...] = attrs.field(
        default=("Authorization", "Content-Type", "X-Request-ID", "x-api-key", "api-key", "anthropic-version",
                 "anthropic-beta", "anthropic-dangerous-direct-browser-access", "OpenAI-Organization",
                 "OpenAI-Project", "Cache-Control", "traceparent", "x-stainless-*"),
        metadata=_doc(
            "Request headers a browser may send: exact names, or patterns ending in `*` (`x-stainless-*` allows "
            "every header whose name starts with `x-stainless-`, as the openai and anthropic SDKs send); a lone "
            "`*` allows any header. Matched case-insensitively against a preflight's "
            "`Access-Control-Request-Headers`: the answer's `Access-Control-Allow-Headers` names the requested "
            "headers allowed (a header not allowed is left out, and the browser refuses the request)."),
    )
    expose_headers: tuple[str, ...] = attrs.field(
        default=("X-Request-ID", "x-ssegate-provider", "x-cache", "x-ratelimit-limit-requests",
                 "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests", "x-ratelimit-limit-tokens",
                 "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens", "Retry-After"),
        metadata=_doc("Response headers a browser may read."),
    )
    max_age: int = attrs.field(default=600, metadata=_doc("Seconds a browser may cache a preflight answer."))


@attrs.frozen
class ProviderConfig:
    name: str = attrs.field(metadata=_doc("Unique provider name (used in routes, logs, metrics)."))
    type: str = attrs.field(
        default="openai", metadata=_doc("Adapter: `openai`, `azure_openai`, `anthropic` or `simulated`.")
    )
    base_url: str = attrs.field(default="", metadata=_doc("Base URL including `/v1` for OpenAI-compatible servers."))
    api_key_env: str | None = attrs.field(default=None, metadata=_doc("Environment variable holding the API key."))
    api_key: str | None = attrs.field(default=None, metadata=_doc("API key; prefer `api_key_env` or `${VAR}`."))
    models: tuple[str, ...] = attrs.field(
        default=("*",), metadata=_doc("Model names served; `*` wildcards allowed (`gpt-4*`).")
    )
    enabled: bool = attrs.field(default=True, metadata=_doc("Disabled providers are never routed to."))
    discover_models: bool = attrs.field(
        default=True, metadata=_doc(
            "When `models` has a pattern, list the upstream's own models (its `GET /models`, those the patterns "
            "match) in the gateway's `/v1/models`, asked at most every `discover_models_ttl` seconds "
            "(`openai`-type providers).")
    )
    discover_models_ttl: float = attrs.field(
        default=60.0, metadata=_doc("Seconds an upstream's model list is kept before `/v1/models` asks again.")
    )
    priority: int = attrs.field(default=1, metadata=_doc("Lower is tried first."))
    weight: float = attrs.field(default=1.0, metadata=_doc("Share of traffic under the `weighted` strategy."))
    timeout: float = attrs.field(default=600.0, metadata=_doc("Total seconds for one upstream request."))
    connect_timeout: float = attrs.field(default=10.0, metadata=_doc("Seconds to open a connection."))
    first_token_timeout: float | None = attrs.field(
        default=None, metadata=_doc("Seconds to the first streamed event (default: `timeout`).")
    )
    idle_timeout: float | None = attrs.field(
        default=None, metadata=_doc("Seconds allowed between streamed events (default: `timeout`).")
    )
    retry_attempts: int = attrs.field(default=0, metadata=_doc("Extra attempts on this provider before fallback."))
    rate_limit: int | None = attrs.field(
        default=None, metadata=_doc(
            "Requests a minute sent to this provider (each attempt counts, retries too), by all replicas together "
            "when `redis.url` is set; a full minute's worth may go at once. At the limit the provider is passed "
            "over for the request's next route, and a request no route takes gets a 429 with `Retry-After`. "
            "Enforced by the `provider_limits` plugin, which joins the pipeline when a provider sets this.")
    )
    max_connections: int = attrs.field(default=100, metadata=_doc("Connection pool size."))
    max_keepalive_connections: int = attrs.field(
        default=100, metadata=_doc(
            "Idle connections kept for reuse (0: none, every connection is closed after its request); one released "
            "while that many are idle is closed at once. Bounds what a burst leaves open, and the stall when "
            "aiohttp closes the expired ones together (~40 µs each).")
    )
    keepalive_expiry: float = attrs.field(default=30.0, metadata=_doc("Seconds an idle connection is kept."))
    headers: dict[str, str] = attrs.field(factory=dict, metadata=_doc("Extra headers sent upstream."))
    api_version: str | None = attrs.field(
        default=None, metadata=_doc("`azure_openai`: the `api-version` query parameter; `anthropic`: the "
                                    "`anthropic-version` header.")
    )
    deployments: dict[str, str] = attrs.field(
        factory=dict, metadata=_doc("`azure_openai`: model name -> deployment name (default: the model name).")
    )
    max_tokens_default: int = attrs.field(
        default=4096, metadata=_doc("`anthropic`: max_tokens sent when the request sets none (Anthropic requires it).")
    )
    circuit_breaker: CircuitBreakerConfig | None = attrs.field(
        default=None, metadata=_doc("This provider's breaker settings (default: the top-level `circuit_breaker`).")
    )
    simulation: SimulationConfig = attrs.field(
        factory=SimulationConfig, metadata=_doc("Settings of a `simulated` provider.")
    )


@attrs.frozen
class PipelineEntry:
    """One plugin of the pipeline: a built-in name, a dotted path `pkg.mod:Obj`, or an entry-point name."""

    name: str = attrs.field(metadata=_doc("The plugin: a built-in name, `package.module:Object`, or an entry point."))
    config: Any = attrs.field(default=None, metadata=_doc("The plugin's settings (its `Config` class)."))


@attrs.frozen
class Config:
    server: ServerConfig = attrs.field(factory=ServerConfig, metadata=_doc("HTTP server."))
    streaming: StreamingConfig = attrs.field(factory=StreamingConfig, metadata=_doc("Streaming behaviour."))
    logging: LoggingConfig = attrs.field(factory=LoggingConfig, metadata=_doc("Logs."))
    redis: RedisConfig = attrs.field(factory=RedisConfig, metadata=_doc("Shared Redis for multi-replica state."))
    circuit_breaker: CircuitBreakerConfig = attrs.field(
        factory=CircuitBreakerConfig, metadata=_doc("Default circuit breaker of every provider.")
    )
    retry: RetryConfig = attrs.field(factory=RetryConfig, metadata=_doc("Retries and the request deadline."))
    observability: ObservabilityConfig = attrs.field(
        factory=ObservabilityConfig, metadata=_doc("Metrics, access log, health.")
    )
    cors: CorsConfig = attrs.field(factory=CorsConfig, metadata=_doc("CORS for browser front ends."))
    providers: tuple[ProviderConfig, ...] = attrs.field(default=(), metadata=_doc("Upstream providers."))
    pipeline: tuple[PipelineEntry, ...] = attrs.field(
        default=(PipelineEntry("router"),), metadata=_doc("Plugins, in call order.")
    )
