"""Cheap token estimates for admission decisions (rate limits, budgets), before any upstream counts.

The estimate follows OpenAI's rule of thumb, about four characters a token (UTF-8 bytes for non-ASCII text,
so CJK text is not underestimated), plus the per-message framing of the chat format. Images count a fixed
``IMAGE_TOKENS``. It needs no tokenizer and costs well under a microsecond per short message. The exact count
arrives later in the answer's ``usage``; limiters reserve the estimate and reconcile with the real figure.
"""
from __future__ import annotations

from typing import Any

import orjson

__all__ = ["estimate_prompt_tokens", "requested_completion_tokens", "IMAGE_TOKENS"]

IMAGE_TOKENS = 765  #: one high-detail 512px-tile image, roughly; low-detail images cost 85
_PER_MESSAGE = 4
_PER_REPLY = 3


def _text_tokens(text: str) -> int:
    n = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    return (n + 3) // 4


def _content_tokens(content: Any) -> int:
    if isinstance(content, str):
        return _text_tokens(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, str):
                total += _text_tokens(part)
            elif isinstance(part, dict):
                kind = part.get("type")
                if kind in ("image_url", "image", "input_image"):
                    total += IMAGE_TOKENS
                elif isinstance(part.get("text"), str):
                    total += _text_tokens(part["text"])
                else:
                    total += _text_tokens(orjson.dumps(part).decode())
        return total
    if content is None:
        return 0
    return _text_tokens(orjson.dumps(content).decode())


def _prompt_tokens(prompt: Any) -> int:
    if isinstance(prompt, str):
        return _text_tokens(prompt)
    if isinstance(prompt, list):
        if prompt and all(isinstance(x, int) for x in prompt):
            return len(prompt)  # already tokens
        return sum(_prompt_tokens(p) for p in prompt)
    return 0


def estimate_prompt_tokens(endpoint: str, body: Any) -> int:
    """Estimated input tokens of an OpenAI-format request body (0 when the body is not understood)."""
    if not isinstance(body, dict):
        return 0
    if endpoint == "chat.completions":
        total = _PER_REPLY
        for message in body.get("messages") or ():
            if isinstance(message, dict):
                total += _PER_MESSAGE + _content_tokens(message.get("content"))
                name = message.get("name")
                if isinstance(name, str):
                    total += _text_tokens(name)
                if message.get("tool_calls"):
                    total += _text_tokens(orjson.dumps(message["tool_calls"]).decode())
        for key in ("tools", "functions", "response_format"):
            if body.get(key):
                total += _text_tokens(orjson.dumps(body[key]).decode())
        return total
    if endpoint == "completions":
        return _prompt_tokens(body.get("prompt"))
    if endpoint == "embeddings":
        return _prompt_tokens(body.get("input"))
    return 0


def requested_completion_tokens(endpoint: str, body: Any, default: int) -> int:
    """Completion tokens the request may produce: ``max_completion_tokens`` or ``max_tokens`` (else
    ``default``), times ``n``; 0 for embeddings."""
    if endpoint == "embeddings" or not isinstance(body, dict):
        return 0
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        limit = default
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > 1:
        limit *= n
    return limit
