"""Getting an answer from the routes: attempts, retries with backoff, circuit breakers, fallback, and the
mid-stream continuation. The relay (``relay.py``) writes; this module decides who is asked and when.

Rules:
- A route is skipped while its provider's circuit is open (half-open lets a bounded number of trials through),
  and while its (provider, model) pair cools down after a 429 with ``Retry-After`` (``cooldown.py``), and when
  an ``upstream_request`` hook declines it (``RouteDeclined``: a provider at its ``rate_limit``).
- Before any content reached the client, a retryable failure (connect error, timeout, 429, 5xx, an error event
  or a truncated stream) is retried on the same provider up to its ``retry_attempts`` with exponential backoff
  and full jitter, honouring ``Retry-After``, then falls back to the next route, all within the request deadline.
- After content reached the client, a failure ends the stream with an SSE error event and ``[DONE]``, or, when
  the route's model group says ``on_midstream_failure: continue``, the next route continues the answer.
"""
from __future__ import annotations

import asyncio
import email.utils
import math
import random
import time
from typing import TYPE_CHECKING, Any, Callable

import orjson
import structlog
from aiohttp import web

from .breaker import CircuitBreaker
from .continuation import Transcript, continuation_messages
from .cooldown import Cooldowns
from .errors import GatewayError, RouteDeclined, StopStream
from .exchange import Exchange, Outcome, Route, Usage
from .openai_format import NOT_TRAILING, stopped_answer, trailing_usage
from .providers.openai import decoded
from .ids import span_id
from .relay import PROVIDER_HEADER, ClientStream, StreamBroken, answer_body, json_response, relay_stream
from .upstream import ENDPOINT_PATHS, Provider, UpstreamError, UpstreamRequest, broken_answer
from .watchdog import Guard

if TYPE_CHECKING:
    from .gateway import Gateway

__all__ = ["Forwarder", "MidStreamFailure"]

log = structlog.get_logger("ssegate.forward")

#: Failure kinds that say something about the provider's health (a 400 says something about the request).
_PROVIDER_FAULTS = frozenset({"connect", "timeout", "protocol", "truncated", "stream_error", "circuit_open", "auth"})


class MidStreamFailure(Exception):
    """An attempt failed after some of its content reached the client."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


def _is_provider_fault(exc: UpstreamError) -> bool:
    """Whether a failure counts against the provider's circuit (a 429 does not: a rate limit is not an outage;
    with ``Retry-After`` it cools down that model of the provider, see ``cooldown.py``)."""
    return exc.kind in _PROVIDER_FAULTS or exc.status >= 500


def _not_here(exc: UpstreamError, provider: str) -> UpstreamError:
    """An upstream's 401, 403 or 404: the next route may answer (no retry here). A 401 or 403 refuses the
    gateway's own credentials for that provider, not the client's: the client gets a 502 ``upstream_auth_error``
    (were it passed on, an SDK would tell its user that their key is wrong), and it counts against the circuit,
    since every request to that provider fails alike. A 404 (a model this provider does not have) is passed on
    as it is when no other route answers."""
    if exc.status == 404:
        exc.fallback = True
        return exc
    return UpstreamError(502, f"provider {provider!r} refused the gateway's credentials (HTTP {exc.status}): "
                         f"{exc.message}", kind="auth", retryable=False, fallback=True, code="upstream_auth_error",
                         detail=exc.detail)


def _retry_after(exc: GatewayError) -> float | None:
    """Seconds the upstream asked to wait: ``Retry-After-Ms`` (Azure OpenAI and OpenAI send it, more precise),
    else ``Retry-After`` (seconds or an HTTP date); None when it asked nothing readable."""
    millis = exc.headers.get("Retry-After-Ms") or exc.headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = exc.headers.get("Retry-After") or exc.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


def _answer_object(body: bytes, provider: Provider) -> dict[str, Any]:
    """A non-stream answer parsed whole; :class:`UpstreamError` (retryable) when a 200 carries no answer: a body
    that is not a JSON object (a web page at a wrong ``base_url``, a cut-off body) or an error object."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise UpstreamError(502, f"provider {provider.name!r} answered HTTP 200 with a body that is not a JSON object",
                            kind="protocol", retryable=True, code="upstream_error")
    error = parsed.get("error")
    if isinstance(error, dict) and "choices" not in parsed and "data" not in parsed:
        raise UpstreamError(502, str(error.get("message") or "upstream error"), kind="status", retryable=True,
                            body=parsed, code=error.get("code"))
    return parsed


#: The ``process_state`` key of what a config reload hands on: ``(identities, breakers, cooldowns)``.
_HEALTH_STATE = "ssegate.provider_health"


def _identity(provider: Provider, breaker_config: Any) -> tuple[Any, ...]:
    """What must stay the same for a provider's health to carry over a reload: where it is, how it is spoken
    to (a new key or header is how a refused key is fixed), whether it is enabled (turned off and on again
    after a fix), and how its circuit counts. Priorities, timeouts or models may change."""
    c = provider.config
    return (c.type, c.base_url, c.api_version, c.deployments, c.api_key_env, c.api_key, c.headers, c.enabled,
            c.simulation, breaker_config)


class Forwarder:
    def __init__(self, gateway: "Gateway") -> None:
        self.gateway = gateway
        self.pipeline = gateway.pipeline
        self.providers = gateway.providers
        self.retry = gateway.config.retry
        # A reload keeps what the gateway learnt of its providers' health: the circuit of a provider that is
        # the same upstream as before (state, failure count, time left open), and the cooldowns of its models.
        # Otherwise a reload during an outage would send traffic straight back to the provider that is down.
        old_identities, old_breakers, old_cooldowns = gateway.process_state.get(_HEALTH_STATE, ({}, {}, None))
        self.identities: dict[str, tuple[Any, ...]] = {}
        self.breakers: dict[str, CircuitBreaker] = {}
        for name, p in gateway.providers.items():
            config = p.config.circuit_breaker or gateway.config.circuit_breaker
            self.identities[name] = identity = _identity(p, config)
            same = old_identities.get(name) == identity and name in old_breakers
            self.breakers[name] = old_breakers[name] if same else CircuitBreaker(name, config)
        # One table for the process (a gateway being retired after a reload still records its 429s in it); the
        # pairs of a provider that is gone or now another upstream are dropped once this gateway serves.
        self.cooldowns: Cooldowns = old_cooldowns if old_cooldowns is not None else Cooldowns()
        self._old_identities: dict[str, tuple[Any, ...]] = old_identities
        s = gateway.config.streaming
        self.keepalive_interval = s.keepalive_interval if s.keepalive else None
        self.rng = random.Random()
        #: The event loop serving requests (set by ``Gateway.start``; looked up once, not per request).
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]

    def hand_on(self) -> None:
        """Make this forwarder's breakers and cooldowns the ones the next reload carries over (called once the
        gateway has started: a reload that is refused leaves the serving gateway's in place)."""
        old, new = self._old_identities, self.identities
        for key in [k for k in self.cooldowns.until if k[0] not in new or new[k[0]] != old.get(k[0])]:
            del self.cooldowns.until[key]
        self.gateway.process_state[_HEALTH_STATE] = (self.identities, self.breakers, self.cooldowns)

    async def forward(self, request: web.Request, exchange: Exchange, routes: list[Route],
                      out: ClientStream | None) -> web.StreamResponse:
        """Try the routes in order (retries, backoff, breakers, fallback) until one answers the client."""
        loop = self.loop
        guard = Guard(loop.time(), self.retry.request_deadline, self.keepalive_interval if out else None,
                      out.keepalive if out is not None else None, loop)
        if out is not None:
            out.guard = guard
        watchdog = self.gateway.watchdog
        watchdog.watch(guard)
        cooldowns = self.cooldowns
        try:
            continue_midstream = out is not None and exchange.on_midstream_failure == "continue"
            transcript = Transcript() if continue_midstream else None
            prefix: str | None = None
            midstream_error: GatewayError | None = None
            last_error: GatewayError | None = None
            for route in routes:
                provider = self.providers.get(route.provider)
                if provider is None:
                    raise GatewayError(500, f"route names unknown provider {route.provider!r}", code="bad_route")
                breaker = self.breakers[provider.name]
                for try_no in range(provider.config.retry_attempts + 1):
                    attempt: dict[str, Any] = {"provider": provider.name, "model": route.model}
                    exchange.attempts.append(attempt)
                    cooling = cooldowns.left(provider.name, route.model) if cooldowns.until else 0.0
                    if cooling:
                        attempt["error"] = "cooldown"
                        last_error = last_error or UpstreamError(
                            429, f"model {route.model!r} of provider {provider.name!r} is rate limited: the provider "
                            f"asked for a pause, {math.ceil(cooling)} s left", kind="cooldown", retryable=True,
                            code="rate_limit_exceeded", headers={"Retry-After": str(max(1, math.ceil(cooling))),
                                                                 "retry-after-ms": str(math.ceil(cooling * 1000))})
                        break
                    if not breaker.acquire():
                        attempt["error"] = "circuit_open"
                        last_error = last_error or UpstreamError(
                            503, f"provider {provider.name!r} is unavailable (circuit open)", kind="circuit_open",
                            retryable=True, code="provider_unavailable",
                            headers={"Retry-After": str(max(1, math.ceil(breaker.retry_in())))})
                        break
                    ureq = self._request(exchange, route, prefix)
                    if self.pipeline.has_upstream_request:
                        try:
                            await self.pipeline.upstream_request(exchange, ureq)
                        except RouteDeclined as declined:  # (a plugin passes over this route: the next one)
                            breaker.release()
                            attempt["error"] = declined.reason
                            last_error = last_error or declined
                            break
                        except BaseException:
                            breaker.release()
                            raise
                    exchange.provider = provider.name
                    exchange.upstream_model = route.model
                    exchange.response_headers[PROVIDER_HEADER] = provider.name
                    try:
                        if out is not None:
                            rewrite = None
                            if transcript is not None:
                                rewrite = transcript.splice if prefix is not None else transcript.observe
                            response = await self._stream(out, provider, ureq, exchange, guard, rewrite)
                        else:
                            response = await self._body(request, provider, ureq, exchange, guard)
                    except UpstreamError as exc:
                        if exc.kind == "status" and exc.status in (401, 403, 404):
                            exc = _not_here(exc, provider.name)
                        attempt["error"], attempt["status"] = exc.kind, exc.status
                        if exc.detail is not None:
                            attempt["detail"] = exc.detail
                        last_error = exc
                        if exc.status == 429 and exc.kind == "status":
                            breaker.release()
                            if breaker.config.enabled:
                                pause = min(_retry_after(exc) or 0.0, breaker.config.recovery_timeout)
                                cooldowns.start(provider.name, route.model, pause)
                        else:
                            breaker.failure() if _is_provider_fault(exc) else breaker.release()
                        log.warning("upstream_failed", provider=provider.name, kind=exc.kind, status=exc.status,
                                    error=exc.message, detail=exc.detail, attempt=try_no + 1)
                        if not exc.retryable:
                            if exc.fallback:
                                break  # the next route, without a retry here
                            raise
                        if try_no < provider.config.retry_attempts:
                            delay = self._backoff(try_no, exc, guard, loop.time())
                            if delay is not None:
                                attempt["retry_in"] = round(delay, 3)
                                await self._sleep(delay, guard)
                                continue
                        break
                    except MidStreamFailure as failure:
                        breaker.failure()
                        attempt["error"], attempt["status"] = "midstream", failure.error.status
                        detail = getattr(failure.error, "detail", None)  # (an UpstreamError's; a timeout has none)
                        if detail is not None:
                            attempt["detail"] = detail
                        midstream_error = last_error = failure.error
                        log.warning("stream_failed_midway", provider=provider.name, error=failure.error.message,
                                    detail=detail, continuing=transcript is not None)
                        final = isinstance(failure.error, UpstreamError) and not failure.error.retryable
                        if transcript is None or final:
                            return await self._end_with_error(out, exchange, failure.error)  # type: ignore[arg-type]
                        prefix = transcript.start_continuation()
                        exchange.state["continued_from"] = provider.name
                        break
                    except BaseException:
                        breaker.release()
                        raise
                    breaker.success()
                    return response
            if midstream_error is not None and out is not None:
                return await self._end_with_error(out, exchange, midstream_error)
            if last_error is None:
                raise GatewayError(503, "no provider is available for this model", code="provider_unavailable")
            raise last_error
        finally:
            watchdog.release(guard)
            # Break the ClientStream <-> Guard cycle (guard.send_keepalive is out.keepalive, and the stream holds
            # its guard): left, every finished stream's exchange, task and buffers waited for a collection of the
            # oldest generation, which the gateway's GC settings make rare (+17 MiB after three waves of 1,000).
            guard.send_keepalive = None
            guard.task = None

    # -- attempts -----------------------------------------------------------------------------------------
    def _request(self, exchange: Exchange, route: Route, prefix: str | None) -> UpstreamRequest:
        ureq = UpstreamRequest(exchange, route, ENDPOINT_PATHS[exchange.endpoint])
        if route.model != exchange.model:
            ureq.json["model"] = route.model
        if exchange.stream and not exchange.include_usage:
            ureq.ask_for_usage()
        if prefix is not None:
            ureq.json["messages"] = continuation_messages(ureq.json.get("messages") or [], prefix)
        if exchange.trace_id is not None:
            # W3C trace context: the same trace, a new span for this upstream call.
            ureq.headers["traceparent"] = f"00-{exchange.trace_id}-{span_id()}-01"
        return ureq

    async def _stream(self, out: ClientStream, provider: Provider, ureq: UpstreamRequest, exchange: Exchange,
                      guard: Guard, rewrite: Callable[[bytes], bytes | None] | None) -> web.StreamResponse:
        cfg = provider.config
        loop = out.loop
        guard.attempt(loop.time(), cfg.first_token_timeout or cfg.timeout, cfg.idle_timeout or cfg.timeout,
                      cfg.timeout)
        started = time.monotonic()
        had_content = out.content_sent
        provider.in_flight += 1
        upstream = None
        if exchange.upstream_sent_at is None:
            exchange.upstream_sent_at = started
        try:
            upstream = await provider.send(ureq)
            await relay_stream(out, upstream, exchange, self.pipeline, rewrite)
            exchange.outcome = Outcome.OK
            exchange.status = 200
            return await out.finish()
        except StreamBroken as broken:
            if not out.content_sent:
                raise broken.error from None
            raise MidStreamFailure(broken.error) from None
        except StopStream as stop:
            exchange.outcome = Outcome.STOPPED
            exchange.status = 200
            return await out.stop(stop)
        except asyncio.CancelledError:
            error = self._timeout_error(guard, provider)
            if error is None:
                raise
            if not out.content_sent:
                raise error from None
            exchange.outcome = Outcome.TIMEOUT if error.kind == "timeout" else Outcome.ERROR
            raise MidStreamFailure(error) from None
        except (ConnectionResetError, BrokenPipeError):
            raise  # the client went away while we wrote
        except GatewayError:
            raise
        except Exception as exc:  # upstream read errors (aiohttp.ClientPayloadError, ...)
            error = broken_answer(provider.name, exc)
            if not out.content_sent:
                raise error from exc
            raise MidStreamFailure(error) from exc
        finally:
            provider.in_flight -= 1
            guard.pause()
            if upstream is not None:
                upstream.close()
            if not had_content and out.content_sent and exchange.first_byte_at is not None:
                provider.observe_ttft(exchange.first_byte_at - started)

    async def _body(self, request: web.Request, provider: Provider, ureq: UpstreamRequest, exchange: Exchange,
                    guard: Guard) -> web.StreamResponse:
        cfg = provider.config
        guard.attempt(self.loop.time(), None, None, cfg.timeout)
        started = time.monotonic()
        provider.in_flight += 1
        if exchange.upstream_sent_at is None:
            exchange.upstream_sent_at = started
        try:
            body = await provider.complete(ureq)
            if exchange.upstream_first_at is None:
                exchange.upstream_first_at = time.monotonic()
        except asyncio.CancelledError:
            error = self._timeout_error(guard, provider)
            if error is None:
                raise
            raise error from None
        except GatewayError:
            raise
        except Exception as exc:
            raise broken_answer(provider.name, exc) from exc
        finally:
            provider.in_flight -= 1
            guard.pause()
        has_on_response = self.pipeline.has_on_response
        outcome = Outcome.OK
        # The usual answer, an object whose last member is its usage, is read from its end; any other (no usage,
        # not an object, an on_response hook to feed) is parsed whole, which also turns a 200 that is not an
        # answer into an error before the client sees it.
        usage = (trailing_usage(body) if not has_on_response and body[:1] == b"{" and b'"usage"' in body
                 else NOT_TRAILING)
        if usage is not NOT_TRAILING:
            if usage is not None:
                exchange.usage = Usage.from_dict(usage)
        else:
            body = decoded(body)  # gzip from an upstream that ignored "Accept-Encoding: identity" (not an object)
            parsed = _answer_object(body, provider)
            exchange.usage = Usage.from_dict(parsed.get("usage"))
            if has_on_response:
                try:
                    body = orjson.dumps(await self.pipeline.on_response(exchange, parsed))
                except StopStream as stop:  # a hook refused the answer: no content, the upstream's usage kept
                    body = orjson.dumps(stopped_answer(exchange.endpoint, parsed, stop.finish_reason))
                    outcome = Outcome.STOPPED
        exchange.outcome = outcome
        exchange.status = 200
        exchange.first_byte_at = time.monotonic()
        provider.observe_ttft(exchange.first_byte_at - started)
        if exchange.ingress != "openai":
            body = answer_body(exchange, body)
        resp = json_response(body, 200, exchange.response_headers)
        await resp.prepare(request)
        await resp.write_eof()
        return resp

    # -- helpers ------------------------------------------------------------------------------------------
    @staticmethod
    def _timeout_error(guard: Guard, provider: Provider) -> UpstreamError | None:
        """Turn a watchdog cancellation into a timeout error (None: a real cancellation, e.g. a disconnect)."""
        kind = guard.expired
        task = asyncio.current_task()
        if kind is None or task is None or task.uncancel() > 0:
            return None
        if kind == "total":
            return UpstreamError(504, "the request deadline passed before an answer was complete",
                                 kind="timeout", retryable=False, code="request_timeout")
        if kind == "shutdown":
            return UpstreamError(503, "the gateway is shutting down; retry the request", kind="shutdown",
                                 retryable=False, code="server_shutting_down")
        guard.expired = None
        what = {"attempt": "upstream", "first_token": "first token", "idle": "idle"}[kind]
        code = {"attempt": "upstream_timeout", "first_token": "first_token_timeout", "idle": "idle_timeout"}[kind]
        return UpstreamError(504, f"provider {provider.name!r}: {what} timeout", kind="timeout", retryable=True,
                             code=code)

    def _backoff(self, try_no: int, exc: GatewayError, guard: Guard, now: float) -> float | None:
        """Seconds to wait before retrying the same provider, or None to move on to the next route."""
        cfg = self.retry
        delay = min(cfg.backoff_max, cfg.backoff_base * (2 ** try_no))
        if cfg.jitter:
            delay = self.rng.uniform(0, delay)
        retry_after = _retry_after(exc)
        if retry_after is not None:
            if retry_after > cfg.max_retry_after:
                return None
            delay = max(delay, retry_after)
        if guard.total_deadline is not None and now + delay >= guard.total_deadline:
            return None
        return delay

    @staticmethod
    async def _sleep(delay: float, guard: Guard) -> None:
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if guard.expired == "total" and task is not None and task.uncancel() == 0:
                raise UpstreamError(504, "the request deadline passed while retrying", kind="timeout",
                                    retryable=False, code="request_timeout") from None
            if guard.expired == "shutdown" and task is not None and task.uncancel() == 0:
                raise UpstreamError(503, "the gateway is shutting down; retry the request", kind="shutdown",
                                    retryable=False, code="server_shutting_down") from None
            raise

    async def _end_with_error(self, out: ClientStream, exchange: Exchange, error: GatewayError
                              ) -> web.StreamResponse:
        exchange.error = error
        exchange.status = 200
        if exchange.outcome in (None, Outcome.OK):
            exchange.outcome = Outcome.ERROR
        return await out.fail(error)
