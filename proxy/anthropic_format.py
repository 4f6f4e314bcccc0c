"""Translation between the OpenAI chat format and the Anthropic Messages format, both directions, whole
answers and streams. Pure functions and small stateful stream translators: no I/O here.

Used by the ``anthropic`` provider (OpenAI request in, Anthropic upstream) and by the ``/v1/messages`` ingress
(Anthropic client in, any provider behind the OpenAI-format pipeline).

Extended thinking, OpenAI client to Anthropic upstream, in the shape OpenAI-compatible gateways (LiteLLM) and
reasoning servers (vLLM, DeepSeek) use: ``reasoning_effort`` (or an Anthropic ``thinking`` object passed as is)
turns thinking on; the thinking comes back as ``reasoning_content`` (streamed as ``delta.reasoning_content``)
and, with its signature, as ``thinking_blocks``; an assistant message that carries its ``thinking_blocks`` back
sends them to Anthropic again, as it requires on the turn after a tool call.

``/v1/messages`` the other way: an Anthropic client's ``thinking``, ``top_k`` and the thinking blocks of its
history have no OpenAI field, so they ride beside the translated request (:func:`anthropic_extras`, kept in
``exchange.state``): an ``anthropic`` provider sends them again, other providers never see them. Reasoning
from any upstream (``reasoning_content`` or ``reasoning``, ``thinking_blocks``) reaches the client as thinking
blocks.
"""
from __future__ import annotations

import os

import time
from typing import Any

import orjson

from .openai_format import reasoning_of
from .sse import Chunk

__all__ = [
    "ANTHROPIC_EXTRAS", "ANTHROPIC_ORIGINAL", "anthropic_extras",
    "to_anthropic_request", "from_anthropic_message", "AnthropicStreamToOpenAI",
    "from_anthropic_request", "to_anthropic_message", "OpenAIStreamToAnthropic",
    "FINISH_FROM_ANTHROPIC", "STOP_FROM_OPENAI", "anthropic_error_body", "anthropic_error", "unsupported_by_anthropic",
]

FINISH_FROM_ANTHROPIC = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                         "tool_use": "tool_calls", "refusal": "content_filter", "pause_turn": "stop"}
STOP_FROM_OPENAI = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                    "function_call": "tool_use", "content_filter": "refusal"}
_ERROR_TYPE_BY_STATUS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                         500: "api_error", 529: "overloaded_error"}
#: The error types Anthropic clients know (the SDK picks its exception class by them).
_ANTHROPIC_ERROR_TYPES = frozenset(_ERROR_TYPE_BY_STATUS.values())
#: OpenAI error types and codes an in-band error may carry, in Anthropic's words (anything else: ``api_error``).
_ERROR_TYPE_FROM_OPENAI = {"rate_limit_exceeded": "rate_limit_error", "overloaded": "overloaded_error",
                           "server_shutting_down": "overloaded_error", "invalid_request_error": "invalid_request_error"}
#: Text blocks become one string, a line apart (joined with nothing, two blocks ran into one word).
_BLOCK_SEPARATOR = "\n"
#: Anthropic's status for ``overloaded_error`` (the anthropic SDK's ``OverloadedError``); OpenAI clients get 503.
OVERLOADED_STATUS = 529
#: Error types and codes, Anthropic's, OpenAI's or the gateway's own, that mean "overloaded, retry later".
_OVERLOADED = frozenset({"overloaded_error", "overloaded", "server_shutting_down"})


#: The ``exchange.state`` key of what a ``/v1/messages`` request carries that the OpenAI format has no field for.
ANTHROPIC_EXTRAS = "anthropic.extras"
#: The ``exchange.state`` key of a ``/v1/messages`` request as the client sent it, with the body bytes of its
#: translation: while nothing changed the translation, an ``anthropic`` provider sends the client's own request.
ANTHROPIC_ORIGINAL = "anthropic.original"
_THINKING_TYPES = ("thinking", "redacted_thinking")
#: Content block types the OpenAI format has a place for; any other (a server tool's call and result:
#: ``server_tool_use``, ``web_search_tool_result``, ``mcp_tool_use``, ...) rides whole in ``anthropic_blocks``.
_TRANSLATED_TYPES = frozenset(("text", "tool_use", "thinking", "redacted_thinking"))
#: The message and delta field of those blocks (an extension, as ``thinking_blocks`` is).
ANTHROPIC_BLOCKS = "anthropic_blocks"
#: The message and delta field of an answer's citations, each span of the text with its own:
#: ``[{"start_index", "end_index", "citations": [...]}]`` (a whole answer's spans carry their ``text`` too).
ANTHROPIC_CITATIONS = "anthropic_citations"


def _url_citations(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The web search citations among ``spans`` as OpenAI's ``annotations`` (``url_citation``: the url and title of
    the source, and the span of the answer it supports)."""
    return [{"type": "url_citation", "url_citation": {
                "url": c.get("url"), "title": c.get("title"), "start_index": span["start_index"],
                "end_index": span["end_index"]}}
            for span in spans for c in span["citations"]
            if isinstance(c, dict) and c.get("type") == "web_search_result_location" and c.get("url")]


def _text_blocks(text: str, spans: Any) -> list[dict[str, Any]]:
    """An answer's text as Anthropic text blocks: its cited spans (``anthropic_citations``) blocks of their own,
    with their citations, while each span still holds the text it was cited for; one block otherwise (a plugin
    changed the text: citations that may no longer fit are left out)."""
    whole = [{"type": "text", "text": text}]
    if not isinstance(spans, list) or not spans:
        return whole
    blocks: list[dict[str, Any]] = []
    at = 0
    for span in spans:
        if not isinstance(span, dict):
            return whole
        start, end = span.get("start_index"), span.get("end_index")
        if type(start) is not int or type(end) is not int or not at <= start <= end <= len(text) or \
                text[start:end] != span.get("text"):
            return whole
        if start > at:
            blocks.append({"type": "text", "text": text[at:start]})
        blocks.append({"type": "text", "text": text[start:end], "citations": span.get("citations") or []})
        at = end
    if at < len(text):
        blocks.append({"type": "text", "text": text[at:]})
    return blocks

#: Thinking budget (tokens) per OpenAI ``reasoning_effort``, as LiteLLM maps it (Anthropic's minimum is 1,024).
REASONING_BUDGET = {"minimal": 1024, "low": 1024, "medium": 2048, "high": 4096}


def _thinking(body: dict[str, Any]) -> dict[str, Any] | None:
    """The Anthropic ``thinking`` object an OpenAI request asks for: its own ``thinking`` (sent as is), else
    one made from ``reasoning_effort``; None for neither (or ``reasoning_effort: "none"``)."""
    thinking = body.get("thinking")
    if isinstance(thinking, dict):
        return thinking
    budget = REASONING_BUDGET.get(body.get("reasoning_effort") or "")
    return {"type": "enabled", "budget_tokens": budget} if budget else None


def _thinking_blocks(blocks: Any) -> list[dict[str, Any]]:
    """The thinking blocks of a list of blocks (an OpenAI message's ``thinking_blocks``, an Anthropic message's
    content), signatures kept."""
    if not isinstance(blocks, list):
        return []
    return [dict(b) for b in blocks if isinstance(b, dict) and b.get("type") in _THINKING_TYPES]


def anthropic_extras(body: dict[str, Any]) -> dict[str, Any] | None:
    """What of an Anthropic Messages request its OpenAI translation cannot carry: ``thinking``, ``top_k``, and
    the thinking blocks of each assistant message (``thinking_history``, one list per assistant message, in
    order). None when there is none."""
    extras: dict[str, Any] = {}
    if isinstance(body.get("thinking"), dict):
        extras["thinking"] = body["thinking"]
    if type(body.get("top_k")) is int:
        extras["top_k"] = body["top_k"]
    history = [_thinking_blocks(m.get("content")) for m in body.get("messages") or ()
               if isinstance(m, dict) and m.get("role") == "assistant"]
    if any(history):
        extras["thinking_history"] = history
    return extras or None


def _message_id(openai_id: Any) -> str:
    """An answer's id as Anthropic spells them (``msg_...``)."""
    text = str(openai_id or "")
    return text if text.startswith("msg_") else "msg_" + (text or os.urandom(12).hex())


def _in_band_error_type(err: dict[str, Any]) -> str:
    kind = err.get("type")
    if kind in _ANTHROPIC_ERROR_TYPES:
        return str(kind)
    return _ERROR_TYPE_FROM_OPENAI.get(err.get("code") or "") or _ERROR_TYPE_FROM_OPENAI.get(kind or "") or "api_error"


def _event(name: str, obj: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj)


def _chunk(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj)


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": _ERROR_TYPE_BY_STATUS.get(status, "api_error"), "message": message}}


def anthropic_error(error: Any) -> tuple[int, dict[str, Any]]:
    """The status and body an Anthropic client (``/v1/messages``) gets for a gateway error (a ``GatewayError``):
    the error's status and the Anthropic type for it, except that an error meaning "overloaded" (an upstream's
    ``overloaded_error``, in its body or code, or the gateway's own ``server_shutting_down``) is Anthropic's 529
    ``overloaded_error``, which the anthropic SDK raises as ``OverloadedError``. OpenAI clients keep the error's
    own (standard) status: this is for the Anthropic ingress only."""
    named = {error.code, getattr(error, "type", None)}
    body = getattr(error, "body", None)
    upstream = body.get("error") if isinstance(body, dict) else None
    if isinstance(upstream, dict):
        named.update((upstream.get("type"), upstream.get("code")))
    status = OVERLOADED_STATUS if named & _OVERLOADED else error.status
    return status, anthropic_error_body(status, error.message)


# -- OpenAI request -> Anthropic request ----------------------------------------------------------------------

def _image_block(url: str) -> dict[str, Any]:
    if url.startswith("data:") and ";base64," in url:
        media, data = url[5:].split(";base64,", 1)
        return {"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _blocks_from_openai_content(content: Any) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            blocks.append({"type": "text", "text": part.get("text", "")})
        elif kind == "image_url":
            image = part.get("image_url")
            blocks.append(_image_block(image.get("url", "") if isinstance(image, dict) else str(image)))
        else:
            continue
        if isinstance(part.get("cache_control"), dict):  # prompt caching, as LiteLLM's clients mark a part
            blocks[-1]["cache_control"] = part["cache_control"]
    return blocks


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return _BLOCK_SEPARATOR.join(p.get("text", "") for p in content or ()
                                 if isinstance(p, dict) and p.get("type") == "text")


def unsupported_by_anthropic(body: dict[str, Any]) -> tuple[str, str] | None:
    """What of an OpenAI chat request the Messages API cannot honour, as ``(param, reason)``; None when nothing.

    - ``n`` above 1: a Messages request has one answer; answering one choice to a request for several would
      pass for a complete answer.
    - ``response_format`` other than ``{"type": "text"}`` (the default, which needs nothing): the Messages API
      has no JSON mode. Forcing a tool whose input schema is the requested one would give JSON that usually
      matches, without the guarantee ``json_schema`` (``strict``) promises, and would clash with the request's
      own tools and ``tool_choice``; the request is refused instead (another route may serve it).
    """
    n = body.get("n")
    if n is not None and n != 1:
        return "n", f"answers one choice per request: 'n': {n} is not supported"
    response_format = body.get("response_format")
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else response_format
        if kind != "text":
            return "response_format", (f"has no JSON mode: 'response_format' {kind!r} is not supported (ask for "
                                       "JSON in the prompt, or route the request to a provider that supports it)")
    return None


def to_anthropic_request(body: dict[str, Any], max_tokens_default: int,
                         extras: dict[str, Any] | None = None) -> dict[str, Any]:
    """An OpenAI chat completion request as an Anthropic Messages request (what it cannot carry is found by
    :func:`unsupported_by_anthropic` first; ``response_format`` ``text`` is the default and needs nothing).
    ``extras``: what a ``/v1/messages`` client sent beside it (:func:`anthropic_extras`)."""
    extras = extras or {}
    history: list[list[dict[str, Any]]] = extras.get("thinking_history") or []
    assistant_turns = 0
    system: list[dict[str, Any]] = []
    messages: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if messages and messages[-1]["role"] == role:  # Anthropic wants alternating turns
            messages[-1]["content"].extend(blocks)
        else:
            messages.append({"role": role, "content": blocks})

    for m in body.get("messages") or ():
        role = m.get("role")
        if role in ("system", "developer"):
            content = m.get("content")
            if isinstance(content, list) and any(isinstance(p, dict) and "cache_control" in p for p in content):
                system += [b for b in _blocks_from_openai_content(content) if b["type"] == "text"]
            else:
                system.append({"type": "text", "text": _text_of(content)})
        elif role == "user":
            add("user", _blocks_from_openai_content(m.get("content")))
        elif role == "assistant":
            thinking_blocks = _thinking_blocks(m.get("thinking_blocks"))
            if not thinking_blocks and assistant_turns < len(history):
                thinking_blocks = history[assistant_turns]
            assistant_turns += 1
            blocks = thinking_blocks + _blocks_from_openai_content(m.get("content"))
            for call in m.get("tool_calls") or ():
                fn = call.get("function") or {}
                try:
                    arguments = orjson.loads(fn.get("arguments") or "{}")
                except orjson.JSONDecodeError:
                    arguments = {"_raw": fn.get("arguments")}
                blocks.append({"type": "tool_use", "id": call.get("id"), "name": fn.get("name"), "input": arguments})
            add("assistant", blocks)
        elif role in ("tool", "function"):
            add("user", [{"type": "tool_result", "tool_use_id": m.get("tool_call_id"),
                          "content": _text_of(m.get("content"))}])
    # A trailing assistant text block must not end with whitespace (Anthropic rejects it); strip it.
    if messages and messages[-1]["role"] == "assistant":
        last = messages[-1]["content"]
        if last and last[-1].get("type") == "text":
            last[-1]["text"] = last[-1]["text"].rstrip()
    out: dict[str, Any] = {
        "model": body.get("model"),
        "messages": messages,
        "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens") or max_tokens_default,
    }
    if system:
        # One string, as before, unless a part is marked for prompt caching: then the blocks, marks kept.
        out["system"] = system if any("cache_control" in b for b in system) else "\n\n".join(
            b["text"] for b in system)
    if body.get("stream"):
        out["stream"] = True
    thinking = _thinking(body) or extras.get("thinking")
    if thinking is not None:
        out["thinking"] = thinking
        budget = thinking.get("budget_tokens")
        if isinstance(budget, int) and out["max_tokens"] <= budget:
            out["max_tokens"] += budget  # the budget counts in max_tokens, which must exceed it
    if thinking is None or thinking.get("type") == "disabled":
        # (with thinking on, Anthropic accepts neither: the answer keeps its default sampling)
        if body.get("temperature") is not None:
            out["temperature"] = min(float(body["temperature"]), 1.0)
        if body.get("top_p") is not None:
            out["top_p"] = body["top_p"]
        top_k = body.get("top_k", extras.get("top_k"))  # (vLLM's extra parameter; an Anthropic client's own)
        if type(top_k) is int:
            out["top_k"] = top_k
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("user"):
        out["metadata"] = {"user_id": body["user"]}
    tools = body.get("tools")
    if tools:
        out["tools"] = [{"name": t["function"]["name"], "description": t["function"].get("description", ""),
                         "input_schema": t["function"].get("parameters") or {"type": "object", "properties": {}},
                         **({"cache_control": t["cache_control"]} if isinstance(t.get("cache_control"), dict)
                            else {})}
                        for t in tools if t.get("type") == "function"]
    choice = body.get("tool_choice")
    if choice is not None and tools:
        if choice == "auto":
            out["tool_choice"] = {"type": "auto"}
        elif choice == "required":
            out["tool_choice"] = {"type": "any"}
        elif choice == "none":
            out["tool_choice"] = {"type": "none"}
        elif isinstance(choice, dict) and choice.get("function"):
            out["tool_choice"] = {"type": "tool", "name": choice["function"]["name"]}
    if body.get("parallel_tool_calls") is False and "tool_choice" in out:
        out["tool_choice"]["disable_parallel_tool_use"] = True
    return out


# -- Anthropic answer -> OpenAI answer -----------------------------------------------------------------------

#: Anthropic's three parts of the prompt count.
_PROMPT_COUNTS = frozenset({"input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"})


def _usage(usage: dict[str, Any]) -> dict[str, Any]:
    """Anthropic's usage in OpenAI's shape. Anthropic counts the prompt in three parts (``input_tokens`` excludes
    what was read from or written to the prompt cache); OpenAI's ``prompt_tokens`` is all of it, with the part
    read from the cache in ``prompt_tokens_details.cached_tokens``."""
    read = int(usage.get("cache_read_input_tokens") or 0)
    prompt = int(usage.get("input_tokens") or 0) + read + int(usage.get("cache_creation_input_tokens") or 0)
    completion = int(usage.get("output_tokens") or 0)
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                           "total_tokens": prompt + completion}
    if "cache_read_input_tokens" in usage or "cache_creation_input_tokens" in usage:
        out["prompt_tokens_details"] = {"cached_tokens": read}
    return out


def _matched_stop(stop_reason: Any, stop_sequence: Any) -> str | None:
    """The stop sequence an Anthropic answer ended on (None unless ``stop_reason`` is ``stop_sequence``)."""
    return stop_sequence if stop_reason == "stop_sequence" and isinstance(stop_sequence, str) and stop_sequence \
        else None


def _stop_sequence_of(choice: dict[str, Any]) -> str | None:
    """The stop sequence an OpenAI-format choice ended on: its ``stop_reason`` when a string and the choice
    finished with ``stop`` (vLLM's field: the matched stop string, an integer for a stop token id; the
    ``anthropic`` adapter sets it the same way from Anthropic's ``stop_sequence``)."""
    seq = choice.get("stop_reason")
    return seq if choice.get("finish_reason") == "stop" and isinstance(seq, str) and seq else None


def from_anthropic_message(msg: dict[str, Any]) -> dict[str, Any]:
    text, calls, thinking, carried, spans = [], [], [], [], []
    for block in msg.get("content") or ():
        if block.get("type") == "text":
            part = block.get("text", "")
            if block.get("citations"):
                at = sum(map(len, text))
                spans.append({"start_index": at, "end_index": at + len(part), "text": part,
                              "citations": block["citations"]})
            text.append(part)
        elif block.get("type") in ("thinking", "redacted_thinking"):
            thinking.append(block)
        elif block.get("type") == "tool_use":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"),
                                       "arguments": orjson.dumps(block.get("input") or {}).decode()}})
        elif isinstance(block, dict) and block.get("type") not in _TRANSLATED_TYPES:
            carried.append(block)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text or not calls else None,
                               "refusal": None}
    if calls:
        message["tool_calls"] = calls
    if carried:
        message[ANTHROPIC_BLOCKS] = carried
    if spans:
        message[ANTHROPIC_CITATIONS] = spans
        message["annotations"] = _url_citations(spans)
    if thinking:
        message["reasoning_content"] = "".join(b.get("thinking", "") for b in thinking if b["type"] == "thinking")
        message["thinking_blocks"] = thinking
    choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None,
                              "finish_reason": FINISH_FROM_ANTHROPIC.get(msg.get("stop_reason") or "", "stop")}
    stop_sequence = _matched_stop(msg.get("stop_reason"), msg.get("stop_sequence"))
    if stop_sequence is not None:
        # OpenAI has no field for it: the matched sequence rides as vLLM's ``stop_reason`` (an extra field the
        # OpenAI SDK keeps), so /v1/messages clients get ``stop_sequence`` back (``to_anthropic_message``).
        choice["stop_reason"] = stop_sequence
    return {
        "id": msg.get("id"), "object": "chat.completion", "created": int(time.time()), "model": msg.get("model"),
        "choices": [choice], "usage": _usage(msg.get("usage") or {}),
    }


def _with_input(block: dict[str, Any], parts: list[str]) -> dict[str, Any]:
    """A carried block as it ended: its ``input`` the JSON its deltas streamed, when they streamed one."""
    if parts:
        try:
            block["input"] = orjson.loads("".join(parts))
        except orjson.JSONDecodeError:
            block["input"] = {}
    return block


class AnthropicStreamToOpenAI:
    """Anthropic SSE events in, OpenAI ``chat.completion.chunk`` events out (raw, without terminators)."""

    __slots__ = ("id", "model", "created", "input_usage", "output_tokens", "tool_index", "block_tools",
                 "finish", "thinking", "carried", "text_length", "cited")

    def __init__(self) -> None:
        self.id = "chatcmpl-anthropic"
        self.model: str | None = None
        self.created = int(time.time())
        self.input_usage: dict[str, Any] = {}
        self.output_tokens = 0
        self.tool_index = -1
        self.block_tools: dict[int, int] = {}
        self.finish: str | None = None
        #: The thinking blocks being streamed, by block index: sent whole, signature included, at their end.
        self.thinking: dict[int, dict[str, Any]] = {}
        #: Blocks of other types being streamed, by block index (the block, its input's JSON parts): sent whole,
        #: as ``anthropic_blocks``, at their end.
        self.carried: dict[int, tuple[dict[str, Any], list[str]]] = {}
        #: Characters of answer text sent so far, and the text blocks being streamed by index (where each starts,
        #: its citations): a block's citations go out when it ends, with the span of text they support.
        self.text_length = 0
        self.cited: dict[int, tuple[int, list[Any]]] = {}

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, stop_sequence: str | None = None) -> bytes:
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        if stop_sequence is not None:
            choice["stop_reason"] = stop_sequence  # (see from_anthropic_message)
        return _chunk({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                       "model": self.model, "choices": [choice]})

    def feed(self, raw: bytes) -> list[bytes]:
        chunk = Chunk(raw)
        obj = chunk.json
        if not isinstance(obj, dict):
            return []
        kind = obj.get("type") or chunk.event
        if kind == "content_block_delta":
            delta = obj.get("delta") or {}
            if delta.get("type") == "text_delta":
                text = delta.get("text", "")
                self.text_length += len(text)
                return [self._chunk({"content": text})]
            if delta.get("type") == "citations_delta":
                cited = self.cited.get(obj.get("index", 0))
                if cited is not None:
                    cited[1].append(delta.get("citation"))
                return []
            if delta.get("type") == "input_json_delta":
                index = self.block_tools.get(obj.get("index", 0))
                if index is None:  # a server tool's call (its input, streamed): with the block, at its end
                    carried = self.carried.get(obj.get("index", 0))
                    if carried is not None:
                        carried[1].append(str(delta.get("partial_json") or ""))
                    return []
                return [self._chunk({"tool_calls": [{"index": index,
                                                     "function": {"arguments": delta.get("partial_json", "")}}]})]
            block = self.thinking.get(obj.get("index", 0))
            if block is not None:
                if delta.get("type") == "thinking_delta":
                    block["thinking"] += delta.get("thinking", "")
                    return [self._chunk({"reasoning_content": delta.get("thinking", "")})]
                if delta.get("type") == "signature_delta":
                    block["signature"] = block.get("signature", "") + delta.get("signature", "")
            return []
        if kind == "message_start":
            message = obj.get("message") or {}
            self.id = message.get("id") or self.id
            self.model = message.get("model")
            self.input_usage = message.get("usage") or {}
            self.output_tokens = int(self.input_usage.get("output_tokens") or 0)
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            block = obj.get("content_block") or {}
            if block.get("type") == "tool_use":
                self.tool_index += 1
                self.block_tools[obj.get("index", 0)] = self.tool_index
                return [self._chunk({"tool_calls": [{"index": self.tool_index, "id": block.get("id"),
                                                     "type": "function",
                                                     "function": {"name": block.get("name"), "arguments": ""}}]})]
            if block.get("type") == "text":
                self.cited[obj.get("index", 0)] = (self.text_length, list(block.get("citations") or ()))
                if block.get("text"):
                    self.text_length += len(block["text"])
                    return [self._chunk({"content": block["text"]})]
                return []
            if block.get("type") == "thinking":
                self.thinking[obj.get("index", 0)] = {"type": "thinking", "thinking": block.get("thinking") or "",
                                                      "signature": block.get("signature") or ""}
                return [self._chunk({"reasoning_content": block["thinking"]})] if block.get("thinking") else []
            if block.get("type") == "redacted_thinking":
                return [self._chunk({"thinking_blocks": [dict(block)]})]
            if block.get("type") not in _TRANSLATED_TYPES and isinstance(block, dict):
                self.carried[obj.get("index", 0)] = (dict(block), [])
            return []
        if kind == "content_block_stop":
            block = self.thinking.pop(obj.get("index", 0), None)
            if block is not None:
                return [self._chunk({"thinking_blocks": [block]})]
            carried = self.carried.pop(obj.get("index", 0), None)
            if carried is not None:
                return [self._chunk({ANTHROPIC_BLOCKS: [_with_input(*carried)]})]
            start, citations = self.cited.pop(obj.get("index", 0), (0, None))
            if citations:
                spans = [{"start_index": start, "end_index": self.text_length, "citations": citations}]
                return [self._chunk({ANTHROPIC_CITATIONS: spans, "annotations": _url_citations(spans)})]
            return []
        if kind == "message_delta":
            usage = obj.get("usage") or {}
            if usage.get("output_tokens") is not None:
                self.output_tokens = int(usage["output_tokens"])
            # Its counts are cumulative; the prompt's (input, cache read, cache creation) may come only here.
            prompt = {k: v for k, v in usage.items() if k in _PROMPT_COUNTS and v is not None}
            if prompt:
                self.input_usage = {**self.input_usage, **prompt}
            delta = obj.get("delta") or {}
            stop = delta.get("stop_reason")
            if stop:
                self.finish = FINISH_FROM_ANTHROPIC.get(stop, "stop")
                return [self._chunk({}, self.finish, _matched_stop(stop, delta.get("stop_sequence")))]
            return []
        if kind == "message_stop":
            usage = _usage({**self.input_usage, "output_tokens": self.output_tokens})
            return [_chunk({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                            "model": self.model, "choices": [], "usage": usage}), b"data: [DONE]"]
        if kind == "error":
            err = obj.get("error") or {}
            return [_chunk({"error": {"message": err.get("message", "upstream error"),
                                      "type": err.get("type", "api_error"), "param": None,
                                      "code": err.get("type")}})]
        return []  # ping, unknown events


# -- Anthropic request (ingress) -> OpenAI request ------------------------------------------------------------

def _openai_parts(blocks: Any) -> tuple[Any, list[dict[str, Any]], list[dict[str, Any]]]:
    """Anthropic content -> (OpenAI content, tool_calls, tool messages)."""
    if isinstance(blocks, str):
        return blocks, [], []
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for block in blocks or ():
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": block.get("text", "")})
        elif kind == "image":
            src = block.get("source") or {}
            url = src.get("url") if src.get("type") == "url" else f"data:{src.get('media_type')};base64,{src.get('data')}"
            parts.append({"type": "image_url", "image_url": {"url": url}})
        elif kind == "tool_use":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"),
                                       "arguments": orjson.dumps(block.get("input") or {}).decode()}})
        elif kind == "tool_result":
            content = block.get("content")
            results.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                            "content": content if isinstance(content, str) else _text_of(content)})
    if all(p["type"] == "text" for p in parts):
        return _BLOCK_SEPARATOR.join(p["text"] for p in parts), calls, results
    return parts, calls, results


def from_anthropic_request(body: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic Messages request as an OpenAI chat completion request."""
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        messages.append({"role": "system", "content": system if isinstance(system, str) else _text_of(system)})
    for m in body.get("messages") or ():
        content, calls, results = _openai_parts(m.get("content"))
        messages.extend(results)
        if m.get("role") == "assistant":
            msg: dict[str, Any] = {"role": "assistant", "content": content or None}
            if calls:
                msg["tool_calls"] = calls
            messages.append(msg)
        elif content or not results:
            messages.append({"role": m.get("role", "user"), "content": content})
    out: dict[str, Any] = {"model": body.get("model"), "messages": messages, "max_tokens": body.get("max_tokens")}
    for key in ("temperature", "top_p", "stream"):
        if body.get(key) is not None:
            out[key] = body[key]
    if body.get("stop_sequences"):
        out["stop"] = list(body["stop_sequences"])
    if (body.get("metadata") or {}).get("user_id"):
        out["user"] = body["metadata"]["user_id"]
    if body.get("tools"):
        out["tools"] = [{"type": "function", "function": {"name": t.get("name"), "description": t.get(
            "description", ""), "parameters": t.get("input_schema") or {}}} for t in body["tools"]]
    choice = body.get("tool_choice") or {}
    if choice and body.get("tools"):
        kind = choice.get("type")
        out["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(kind) or {
            "type": "function", "function": {"name": choice.get("name")}}
    return out


# -- OpenAI answer -> Anthropic answer (ingress egress) --------------------------------------------------------

def _prompt_counts(usage: dict[str, Any]) -> dict[str, int]:
    """OpenAI's prompt count as Anthropic splits it: the tokens read from the prompt cache
    (``prompt_tokens_details.cached_tokens``) become ``cache_read_input_tokens``, and ``input_tokens`` the rest."""
    prompt = int(usage.get("prompt_tokens") or 0)
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    if cached is None:
        return {"input_tokens": prompt}
    cached = min(int(cached), prompt)
    return {"input_tokens": prompt - cached, "cache_read_input_tokens": cached}


def _anthropic_usage(usage: dict[str, Any] | None) -> dict[str, int]:
    usage = usage or {}
    return {**_prompt_counts(usage), "output_tokens": int(usage.get("completion_tokens") or 0)}


def to_anthropic_message(body: dict[str, Any]) -> dict[str, Any]:
    choice = (body.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = _thinking_blocks(message.get("thinking_blocks"))
    reasoning = reasoning_of(message)
    if not content and reasoning is not None:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})  # (unsigned: not Claude's)
    content += [b for b in message.get(ANTHROPIC_BLOCKS) or () if isinstance(b, dict) and b.get("type")]
    if message.get("content"):
        content += _text_blocks(message["content"], message.get(ANTHROPIC_CITATIONS))
    for call in message.get("tool_calls") or ():
        fn = call.get("function") or {}
        try:
            arguments = orjson.loads(fn.get("arguments") or "{}")
        except orjson.JSONDecodeError:
            arguments = {}
        content.append({"type": "tool_use", "id": call.get("id"), "name": fn.get("name"), "input": arguments})
    stop_sequence = _stop_sequence_of(choice)
    stop_reason = "stop_sequence" if stop_sequence is not None else STOP_FROM_OPENAI.get(
        choice.get("finish_reason") or "stop", "end_turn")
    return {"id": _message_id(body.get("id")), "type": "message", "role": "assistant", "model": body.get("model"),
            "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": _anthropic_usage(body.get("usage"))}


class OpenAIStreamToAnthropic:
    """OpenAI chunk events in, Anthropic SSE events out (for ``/v1/messages`` clients).

    ``message_start`` carries the answer's id and model, taken from the first chunks that have them: Azure opens
    its streams with a prompt-filter chunk (``prompt_filter_results``, empty ``choices``, ``id`` and ``model``
    ``""``), so a chunk with no choices and no id or model yet says nothing and is waited past. ``message_start``
    goes out with the first chunk that has choices (or has both an id and a model), and at the latest before the
    stream's end; a stream that never names its id gets a made-up one (``msg_<random>``)."""

    __slots__ = ("started", "block", "block_kind", "tools", "stop_reason", "stop_sequence", "usage", "model", "id",
                 "finished")

    def __init__(self) -> None:
        self.started = False
        self.block = -1
        self.block_kind: str | None = None
        self.tools: dict[int, int] = {}
        self.stop_reason: str | None = None
        self.stop_sequence: str | None = None
        self.usage: dict[str, Any] | None = None
        #: The upstream's model and id (the first non-empty ones), until message_start; then the message's.
        self.model: str | None = None
        self.id: str | None = None
        self.finished = False

    def _start(self) -> list[bytes]:
        self.started = True
        self.id = _message_id(self.id)
        # OpenAI sends usage at the end of the stream; a provider that sends it before the answer gives the
        # prompt count here already.
        prompt = (self.usage or {}).get("prompt_tokens")
        return [_event("message_start", {"type": "message_start", "message": {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": int(prompt or 0), "output_tokens": 0}}})]

    def _close_block(self) -> list[bytes]:
        if self.block_kind is None:
            return []
        self.block_kind = None
        return [_event("content_block_stop", {"type": "content_block_stop", "index": self.block})]

    def _open_block(self, kind: str, block: dict[str, Any]) -> list[bytes]:
        out = self._close_block()
        self.block += 1
        self.block_kind = kind
        out.append(_event("content_block_start", {"type": "content_block_start", "index": self.block,
                                                  "content_block": block}))
        return out

    def _thinking_delta(self, text: str) -> list[bytes]:
        out = [] if self.block_kind == "thinking" else self._open_block(
            "thinking", {"type": "thinking", "thinking": "", "signature": ""})
        out.append(_event("content_block_delta", {"type": "content_block_delta", "index": self.block,
                                                  "delta": {"type": "thinking_delta", "thinking": text}}))
        return out

    def _thinking_ends(self, blocks: Any) -> list[bytes]:
        """Whole thinking blocks (``thinking_blocks``, as an ``anthropic`` provider sends one when it ends): the
        signature of the thinking block being streamed, or a block of its own."""
        out: list[bytes] = []
        for block in _thinking_blocks(blocks):
            if block["type"] == "redacted_thinking":
                out += self._open_block("redacted_thinking", {"type": "redacted_thinking",
                                                              "data": block.get("data", "")})
            else:
                if self.block_kind != "thinking" and block.get("thinking"):
                    out += self._thinking_delta(str(block["thinking"]))
                if block.get("signature") and self.block_kind == "thinking":
                    out.append(_event("content_block_delta", {
                        "type": "content_block_delta", "index": self.block,
                        "delta": {"type": "signature_delta", "signature": block["signature"]}}))
            out += self._close_block()
        return out

    def _carried(self, blocks: Any) -> list[bytes]:
        """Whole blocks of the types the OpenAI format has no place for (a server tool's call and result), each a
        block of its own: a call's ``input`` streamed as one ``input_json_delta``, as Anthropic streams it."""
        out: list[bytes] = []
        for block in blocks if isinstance(blocks, list) else ():
            if not isinstance(block, dict) or not block.get("type"):
                continue
            if "input" in block:
                out += self._open_block("carried", {**block, "input": {}})
                out.append(_event("content_block_delta", {
                    "type": "content_block_delta", "index": self.block,
                    "delta": {"type": "input_json_delta", "partial_json": orjson.dumps(block["input"]).decode()}}))
            else:
                out += self._open_block("carried", block)
            out += self._close_block()
        return out

    def _citations(self, spans: Any) -> list[bytes]:
        """The citations of the text just streamed, on the text block it went into (a stream's text blocks are
        one, so the client gets the sources of the answer, not which part of it each supports)."""
        out: list[bytes] = []
        for span in spans if isinstance(spans, list) else ():
            for citation in span.get("citations") or () if isinstance(span, dict) else ():
                if self.block_kind != "text":
                    out += self._open_block("text", {"type": "text", "text": ""})
                out.append(_event("content_block_delta", {"type": "content_block_delta", "index": self.block,
                                                          "delta": {"type": "citations_delta", "citation": citation}}))
        return out

    def feed(self, raw: bytes) -> list[bytes]:
        if raw.startswith(b":"):
            return [raw]
        chunk = Chunk(raw)
        if chunk.is_done:
            return self.finish()
        obj = chunk.json
        if not isinstance(obj, dict):
            return []
        if "error" in obj and isinstance(obj["error"], dict):
            err = obj["error"]
            self.finished = True
            return [_event("error", {"type": "error", "error": {"type": _in_band_error_type(err),
                                                                "message": err.get("message", "")}})]
        if obj.get("usage"):
            self.usage = obj["usage"]
        choices = obj.get("choices")
        out: list[bytes] = []
        if not self.started:
            if not self.id and obj.get("id"):
                self.id = str(obj["id"])
            if not self.model and obj.get("model"):
                self.model = str(obj["model"])
            if not choices and not (self.id and self.model):
                return []  # Azure's prompt-filter chunk: no answer, and not who answers yet
            out = self._start()
        for choice in choices or ():
            delta = choice.get("delta") or {}
            reasoning = reasoning_of(delta)
            if reasoning is not None:
                out += self._thinking_delta(reasoning)
            if delta.get("thinking_blocks"):
                out += self._thinking_ends(delta["thinking_blocks"])
            if delta.get(ANTHROPIC_BLOCKS):
                out += self._carried(delta[ANTHROPIC_BLOCKS])
            if delta.get(ANTHROPIC_CITATIONS):
                out += self._citations(delta[ANTHROPIC_CITATIONS])
            if delta.get("content"):
                if self.block_kind != "text":
                    out += self._open_block("text", {"type": "text", "text": ""})
                out.append(_event("content_block_delta", {"type": "content_block_delta", "index": self.block,
                                                          "delta": {"type": "text_delta", "text": delta["content"]}}))
            for call in delta.get("tool_calls") or ():
                idx = call.get("index", 0)
                fn = call.get("function") or {}
                if idx not in self.tools:
                    out += self._open_block("tool", {"type": "tool_use", "id": call.get("id"),
                                                     "name": fn.get("name"), "input": {}})
                    self.tools[idx] = self.block
                if fn.get("arguments"):
                    out.append(_event("content_block_delta", {
                        "type": "content_block_delta", "index": self.tools[idx],
                        "delta": {"type": "input_json_delta", "partial_json": fn["arguments"]}}))
            if choice.get("finish_reason"):
                self.stop_sequence = _stop_sequence_of(choice)
                self.stop_reason = "stop_sequence" if self.stop_sequence is not None else STOP_FROM_OPENAI.get(
                    choice["finish_reason"], "end_turn")
        return out

    def finish(self) -> list[bytes]:
        if self.finished:
            return []
        self.finished = True
        out = [] if self.started else self._start()
        out += self._close_block()
        usage = self.usage or {}
        delta_usage = {"output_tokens": int(usage.get("completion_tokens") or 0)}
        if usage.get("prompt_tokens") is not None:
            # message_delta counts are cumulative: the prompt count, unknown at message_start, goes here
            # (the anthropic SDK's final message takes input_tokens and the cache counts from it).
            delta_usage.update(_prompt_counts(usage))
        out.append(_event("message_delta", {"type": "message_delta", "delta": {
            "stop_reason": self.stop_reason or "end_turn", "stop_sequence": self.stop_sequence},
            "usage": delta_usage}))
        out.append(_event("message_stop", {"type": "message_stop"}))
        return out
