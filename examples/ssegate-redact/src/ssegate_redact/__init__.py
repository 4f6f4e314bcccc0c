"""ssegate-redact: e-mail addresses and card numbers reach neither the model nor the client (chat, completions and
embeddings requests; streamed and whole answers)."""
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
        body = request.json  # a copy: the client's own request stays as it came
        if "messages" in body:  # chat (and Anthropic /v1/messages, translated to chat at the edge)
            body["messages"] = [self.redactor.message(m) for m in body["messages"]]
        for key in ("prompt", "input"):  # completions, embeddings: a string or a list of strings
            if key in body:
                body[key] = self.redactor.texts(body[key])

    @hookimpl
    def on_chunk(self, exchange: Exchange, chunk: Chunk) -> list[Chunk] | None:
        return exchange.state_of(StreamState).feed(chunk, self.redactor)

    @hookimpl
    def on_response(self, body: Any) -> None:
        for choice in body.get("choices") or ():
            message = choice.get("message") or {}
            if isinstance(message.get("content"), str):  # chat
                message["content"] = self.redactor.redact(message["content"])
            if isinstance(choice.get("text"), str):  # completions
                choice["text"] = self.redactor.redact(choice["text"])
