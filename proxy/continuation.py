"""Mid-stream continuation: when an upstream breaks after content reached the client, ask the next route to
continue the same answer, and splice its stream into the client's as if nothing happened.

The :class:`Transcript` watches a stream (only when continuation is on for the request, since it parses every
event) and remembers the text sent and the stream's ``id``/``created``/``model``. A continuation request carries
that text as a trailing assistant message (a prefill: Anthropic continues it natively; OpenAI-compatible servers
such as vLLM continue it with ``continue_final_message``). The continuation's events are rewritten: its role
chunk is dropped, its ``id``/``created``/``model`` become the original's, text that only repeats what was already
sent is dropped, and its usage chunk adds the tokens of the broken part.
"""
from __future__ import annotations

from typing import Any

import orjson

from .sse import encode_event

__all__ = ["Transcript", "continuation_messages"]


def _load(ev: bytes) -> Any:
    if not ev.startswith(b"data: ") or b"\n" in ev:
        return None
    try:
        return orjson.loads(ev[6:])
    except orjson.JSONDecodeError:
        return None


class Transcript:
    __slots__ = ("parts", "template", "content_events", "echo", "continuing", "broken_tokens")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.template: dict[str, Any] | None = None
        self.content_events = 0
        self.echo = ""
        self.continuing = False
        self.broken_tokens = 0

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def observe(self, ev: bytes) -> bytes:
        """Rewrite hook of a first attempt: remember, change nothing."""
        obj = _load(ev)
        if isinstance(obj, dict):
            if self.template is None and obj.get("id"):
                self.template = {k: obj.get(k) for k in ("id", "created", "model", "system_fingerprint")}
            self._collect(obj)
        return ev

    def _collect(self, obj: dict[str, Any]) -> None:
        for choice in obj.get("choices") or ():
            content = (choice.get("delta") or {}).get("content")
            if content:
                self.parts.append(content)
                self.content_events += 1

    def start_continuation(self) -> str:
        """Called when the stream broke: returns the prefix to continue from."""
        self.continuing = True
        self.echo = self.text
        self.broken_tokens += self.content_events
        self.content_events = 0
        return self.echo

    def splice(self, ev: bytes) -> bytes | None:
        """Rewrite hook of a continuation attempt."""
        obj = _load(ev)
        if not isinstance(obj, dict) or "error" in obj:
            return ev
        template = self.template or {}
        for key in ("id", "created", "model", "system_fingerprint"):
            if template.get(key) is not None:
                obj[key] = template[key]
        usage = obj.get("usage")
        if isinstance(usage, dict) and self.broken_tokens:
            usage["completion_tokens"] = int(usage.get("completion_tokens") or 0) + self.broken_tokens
            usage["total_tokens"] = int(usage.get("prompt_tokens") or 0) + usage["completion_tokens"]
        choices = obj.get("choices") or []
        for choice in choices:
            delta = choice.get("delta") or {}
            if "role" in delta and not delta.get("content") and not choice.get("finish_reason"):
                delta.pop("role")
                if not delta and not obj.get("usage"):
                    return None  # the continuation's own role chunk: the client already had one
            content = delta.get("content")
            if content and self.echo:
                if self.echo.startswith(content):  # the upstream repeats the prefix: already sent
                    self.echo = self.echo[len(content):]
                    delta["content"] = ""
                    if not choice.get("finish_reason"):
                        return None
                elif content.startswith(self.echo):
                    delta["content"] = content[len(self.echo):]
                    self.echo = ""
                else:
                    self.echo = ""
        self._collect(obj)
        return encode_event(orjson.dumps(obj))


def continuation_messages(messages: list[Any], prefix: str) -> list[Any]:
    """The original conversation plus the text already streamed, as the assistant's unfinished turn."""
    return [*messages, {"role": "assistant", "content": prefix}]
