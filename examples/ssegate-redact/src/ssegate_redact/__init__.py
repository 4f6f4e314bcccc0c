"""ssegate-redact: e-mail addresses and card numbers reach neither the model nor the client."""
from __future__ import annotations

from typing import Any

from proxy import Chunk, Exchange, UpstreamRequest, hookimpl, plugin_config, setting

from ._scan import Redactor, StreamState


@plugin_config
class RedactConfig:
    mask: str = setting("[redacted]", doc="What replaces each e-mail address or card number.")
    emails: bool = setting(True, doc="Redact e-mail addresses.")
    cards: bool = setting(True, doc="Redact card numbers: 13 to 19 digits, spaces or dashes allowed, Luhn-checked.")


class Redact:
    """The ``redact`` plugin: rewrites the prompt, the streamed answer (across chunks) and whole answers."""

    Config = RedactConfig
    requires_hook_api = "1.0"

    def __init__(self, config: RedactConfig) -> None:
        self.redactor = Redactor(config.mask, emails=config.emails, cards=config.cards)

    @hookimpl
    def upstream_request(self, request: UpstreamRequest) -> None:
        if "messages" in request.json:  # chat: a new list; the client's own stays as it came
            request.json["messages"] = [self.redactor.message(m) for m in request.json["messages"]]

    @hookimpl
    def on_chunk(self, exchange: Exchange, chunk: Chunk) -> list[Chunk] | None:
        return exchange.state_of(StreamState).feed(chunk, self.redactor)

    @hookimpl
    def on_response(self, body: Any) -> None:
        for choice in body.get("choices") or ():
            message = choice.get("message") or {}
            if isinstance(message.get("content"), str):
                message["content"] = self.redactor.redact(message["content"])
