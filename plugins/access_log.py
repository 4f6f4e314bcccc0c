"""One access log line per exchange, written in ``exchange_done`` (so rejected, failed and abandoned
requests are logged too). Never a key or a prompt: the caller is named by its principal's name, and prompt
text appears only with ``observability.log_prompts: true``."""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import structlog

from proxy.tasks import stop_task
from proxy import hookimpl
from proxy.log import flush_lines, line_writer

if TYPE_CHECKING:
    from proxy import Exchange
    from proxy.gateway import Gateway

__all__ = ["AccessLogPlugin"]

log = structlog.get_logger("ssegate.access")

#: Seconds between flushes of buffered access lines (JSON fast path).
FLUSH_INTERVAL = 0.25


class AccessLogPlugin:
    def __init__(self) -> None:
        self.log_prompts = False
        self.write = None
        self._flusher: asyncio.Task[None] | None = None

    @hookimpl
    def startup(self, gateway: "Gateway") -> None:
        self.log_prompts = gateway.config.observability.log_prompts
        self.write = line_writer("ssegate.access")  # the fast JSON path when JSON logs are configured
        if self.write is not None:
            # A flush per line is a syscall per request; lines are flushed together, FLUSH_INTERVAL apart.
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop(), name="ssegate-log-flush")

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            flush_lines()

    @hookimpl
    async def shutdown(self, gateway: "Gateway") -> None:
        flusher, self._flusher = self._flusher, None
        await stop_task(flusher)
        flush_lines()

    @hookimpl
    def exchange_done(self, exchange: "Exchange") -> None:
        usage = exchange.usage
        started, first, ended = exchange.started, exchange.first_byte_at, exchange.ended
        principal = exchange.principal
        ingress = exchange.ingress
        status = exchange.status
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
        if exchange.tags:
            fields["tags"] = sorted(exchange.tags)
        if self.log_prompts:
            body = exchange._json  # the parsed request, if it parsed
            if isinstance(body, dict):
                fields["messages"] = body.get("messages") or body.get("prompt")
        level = "info" if status < 500 else "warning"
        if self.write is not None:
            self.write(level, "access", fields)
        else:
            getattr(log, level)("access", **fields)
