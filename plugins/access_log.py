"""One access log line per exchange, written in ``exchange_done`` (so rejected, failed and abandoned
requests are logged too). Never a key or a prompt: the caller is named by its principal's name, and prompt
text appears only with ``observability.log_prompts: true``."""
from __future__ import annotations

import asyncio
import datetime
from time import monotonic
from typing import TYPE_CHECKING, Any, Callable

import orjson
import structlog

from proxy import hookimpl
from proxy.log import LINE_OPTIONS, flush_lines, line_sink

if TYPE_CHECKING:
    from proxy import Exchange
    from proxy.gateway import Gateway

__all__ = ["AccessLogPlugin"]

log = structlog.get_logger("ssegate.access")

#: Seconds between flushes of buffered access lines (JSON fast path).
FLUSH_INTERVAL = 0.25

_now, _UTC = datetime.datetime.now, datetime.timezone.utc
_INFO, _WARNING = 20, 30


class AccessLogPlugin:
    def __init__(self) -> None:
        self.log_prompts = False
        #: The fast JSON path (set when JSON logs are configured): raw writer and the logger's level threshold.
        self.write_bytes: Callable[[bytes], Any] | None = None
        self.threshold = _INFO
        self._loop: asyncio.AbstractEventLoop | None = None
        #: When buffered lines were last flushed (``monotonic``), and the pending flush of lines written since.
        self._flushed_at = -FLUSH_INTERVAL
        self._flush_timer: asyncio.TimerHandle | None = None

    @hookimpl
    def startup(self, gateway: "Gateway") -> None:
        self.log_prompts = gateway.config.observability.log_prompts
        sink = line_sink("ssegate.access")  # the fast JSON path when JSON logs are configured
        if sink is not None:
            self.write_bytes, self.threshold = sink
            self._loop = asyncio.get_running_loop()

    def _flush_soon(self, now: float) -> None:
        """After a line is buffered: flush at once if the last flush is ``FLUSH_INTERVAL`` old, else once that
        long after it (one timer for all the lines in between). A flush per line would be a syscall per request
        under load; a timer that ticks regardless would wake an idle gateway four times a second, and each
        wake-up of an idle process costs more CPU than a request's whole access line (on a VM ~150 µs)."""
        if self._flush_timer is not None:
            return
        wait = self._flushed_at + FLUSH_INTERVAL - now
        if wait <= 0:
            self._flushed_at = now
            flush_lines()
        elif self._loop is not None:
            self._flush_timer = self._loop.call_later(wait, self._timed_flush)

    def _timed_flush(self) -> None:
        self._flush_timer = None
        self._flushed_at = monotonic()
        flush_lines()

    @hookimpl
    async def shutdown(self, gateway: "Gateway") -> None:
        timer, self._flush_timer = self._flush_timer, None
        if timer is not None:
            timer.cancel()
        flush_lines()

    @hookimpl
    def exchange_done(self, exchange: "Exchange") -> None:
        status = exchange.status
        write_bytes = self.write_bytes
        if write_bytes is not None and (_INFO if status < 500 else _WARNING) < self.threshold:
            return
        usage = exchange.usage
        started, first, ended = exchange.started, exchange.first_byte_at, exchange.ended
        principal = exchange.principal
        ingress = exchange.ingress
        fields = {
            "request_id": exchange.request_id,
            "trace_id": exchange.trace_id,
            "route": exchange.endpoint if ingress == "openai" else f"{exchange.endpoint}:{ingress}",
            "key": principal.name if principal is not None else None,
            "client_ip": exchange.client_ip,
            "model": exchange.model,
            "provider": exchange.provider,
            "status": status,
            "outcome": exchange.outcome,
            "stream": exchange.stream,
            "ttft_ms": None if first is None else int((first - started) * 100000 + 0.5) / 100,
            "duration_ms": None if ended is None else int((ended - started) * 100000 + 0.5) / 100,
            "prompt_tokens": usage.prompt_tokens if usage is not None else None,
            "completion_tokens": usage.completion_tokens if usage is not None else None,
            "cache": exchange.response_headers.get("x-cache"),
            "retries": max(0, len(exchange.attempts) - 1),
        }
        if exchange.error is not None:
            fields["error_code"] = exchange.error.code
        if exchange.endpoint == "unmatched":  # no route: the method and path asked for
            fields["path"] = exchange.state.get("path")
        if exchange.tags:
            fields["tags"] = sorted(exchange.tags)
        if self.log_prompts:
            body = exchange._json  # the parsed request, if it parsed
            if body is None and exchange.model is not None and exchange.body:
                body = exchange.json  # it parsed, and was let go once routed (a long request)
            if isinstance(body, dict):
                fields["messages"] = body.get("messages") or body.get("prompt")
        if write_bytes is None:
            (log.info if status < 500 else log.warning)("access", **fields)
            return
        fields["event"] = "access"
        fields["level"] = "info" if status < 500 else "warning"
        fields["logger"] = "ssegate.access"
        fields["timestamp"] = _now(_UTC)  # orjson writes it as ISO 8601 with "Z"
        write_bytes(orjson.dumps(fields, default=str, option=LINE_OPTIONS))
        if self._flush_timer is None:  # (else a flush is due already: under load, the usual case)
            self._flush_soon(monotonic() if ended is None else ended)
