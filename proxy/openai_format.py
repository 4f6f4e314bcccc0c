"""Small conversions between OpenAI answer shapes: a chunk sequence <-> a complete answer, final chunks."""
from __future__ import annotations

import os
import time
from typing import Any

import orjson

__all__ = ["merge_chunks", "body_to_chunks", "finish_chunk", "new_id", "trailing_usage", "NOT_TRAILING"]

#: :func:`trailing_usage` could not tell: parse the whole body.
NOT_TRAILING: Any = object()
_WHITESPACE = b" \t\r\n"


def trailing_usage(body: bytes) -> Any:
    """The ``usage`` object of a non-stream answer whose last member it is (where OpenAI, vLLM, Ollama and the
    simulator put it), read without parsing the rest of the body; :data:`NOT_TRAILING` when that cannot be
    told for sure (then parse the body whole).

    Why the byte search is sound: inside a JSON string every ``"`` is escaped, so a ``"usage"`` not preceded
    by a backslash is a string token of the document; followed by ``:`` it is a key; and when everything
    between that colon and the body's final ``}`` is one JSON value, the key belongs to the outermost object
    (a key of a nested object would leave that object's own ``}`` in between, which does not parse).
    """
    at = body.rfind(b'"usage"')
    end = body.rfind(b"}")
    # (before "usage": a backslash means inside a string; after the final "}": only whitespace)
    if at <= 0 or end < at or body[at - 1] == 0x5C or body[end + 1:].strip(_WHITESPACE):
        return NOT_TRAILING
    value = body[at + 7:end].lstrip(_WHITESPACE)
    if value[:1] != b":":
        return NOT_TRAILING
    try:
        return orjson.loads(value[1:])
    except orjson.JSONDecodeError:
        return NOT_TRAILING


def new_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{os.urandom(12).hex()}"


#: The members reasoning servers put a model's thinking in (vLLM, DeepSeek: ``reasoning_content``; OpenRouter and
#: newer vLLM: ``reasoning``), kept through merging and splitting like the content.
REASONING_MEMBERS = ("reasoning_content", "reasoning")


def reasoning_of(message: dict[str, Any]) -> str | None:
    """A message's or a delta's thinking text (under either of :data:`REASONING_MEMBERS`), or None."""
    text = message.get("reasoning_content") or message.get("reasoning")
    return text if isinstance(text, str) and text else None


def merge_chunks(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge ``chat.completion.chunk`` (or ``text_completion``) objects into the equivalent complete answer."""
    first = next((c for c in chunks if isinstance(c, dict)), {})
    is_chat = first.get("object", "chat.completion.chunk") == "chat.completion.chunk"
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    for chunk in chunks:
        if not isinstance(chunk, dict):
            continue
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            idx = choice.get("index", 0)
            acc = choices.setdefault(idx, {"index": idx, "role": None, "content": [], "tool_calls": {},
                                           "finish_reason": None, "refusal": None, "logprobs": None})
            if choice.get("finish_reason"):
                acc["finish_reason"] = choice["finish_reason"]
            if choice.get("stop_reason") is not None:  # the matched stop sequence (vLLM's member; Anthropic's)
                acc["stop_reason"] = choice["stop_reason"]
            logprobs = choice.get("logprobs")
            if isinstance(logprobs, dict):  # chat: {"content": [...], "refusal": [...]}, each chunk's part in order
                merged = acc["logprobs"] = acc["logprobs"] or {}
                for key, items in logprobs.items():
                    if isinstance(items, list):
                        merged[key] = (merged.get(key) or []) + items
                    elif key not in merged:
                        merged[key] = items
            if not is_chat:
                acc["content"].append(choice.get("text") or "")
                continue
            delta = choice.get("delta") or {}
            acc["role"] = delta.get("role") or acc["role"]
            if delta.get("content"):
                acc["content"].append(delta["content"])
            if delta.get("refusal"):
                acc["refusal"] = (acc["refusal"] or "") + delta["refusal"]
            for key in REASONING_MEMBERS:  # a reasoning model's thinking, under the member its server uses
                if delta.get(key) and isinstance(delta[key], str):
                    acc[key] = acc.get(key, "") + delta[key]
            if isinstance(delta.get("thinking_blocks"), list):
                acc["thinking_blocks"] = acc.get("thinking_blocks", []) + delta["thinking_blocks"]
            for tc in delta.get("tool_calls") or ():
                slot = acc["tool_calls"].setdefault(tc.get("index", 0), {"id": None, "type": "function",
                                                                         "function": {"name": "", "arguments": ""}})
                slot["id"] = tc.get("id") or slot["id"]
                fn = tc.get("function") or {}
                slot["function"]["name"] += fn.get("name") or ""
                slot["function"]["arguments"] += fn.get("arguments") or ""
    out_choices = []
    for idx in sorted(choices):
        acc = choices[idx]
        if is_chat:
            message: dict[str, Any] = {"role": acc["role"] or "assistant", "content": "".join(acc["content"]) or None,
                                       "refusal": acc["refusal"]}
            if acc["tool_calls"]:
                message["tool_calls"] = [acc["tool_calls"][k] for k in sorted(acc["tool_calls"])]
            for key in (*REASONING_MEMBERS, "thinking_blocks"):
                if key in acc:
                    message[key] = acc[key]
            out_choices.append({"index": idx, "message": message, "logprobs": acc["logprobs"],
                                "finish_reason": acc["finish_reason"]})
        else:
            out_choices.append({"index": idx, "text": "".join(acc["content"]), "logprobs": acc["logprobs"],
                                "finish_reason": acc["finish_reason"]})
        if "stop_reason" in acc:
            out_choices[-1]["stop_reason"] = acc["stop_reason"]
    body = {
        "id": first.get("id") or new_id(),
        "object": "chat.completion" if is_chat else "text_completion",
        "created": first.get("created") or int(time.time()),
        "model": first.get("model"),
        "choices": out_choices,
    }
    if first.get("system_fingerprint"):
        body["system_fingerprint"] = first["system_fingerprint"]
    if usage is not None:
        body["usage"] = usage
    return body


def body_to_chunks(body: dict[str, Any], include_usage: bool = False) -> list[dict[str, Any]]:
    """Split a complete ``chat.completion`` into the chunk sequence a stream of it would carry."""
    base = {"id": body.get("id") or new_id(), "object": "chat.completion.chunk",
            "created": body.get("created") or int(time.time()), "model": body.get("model")}
    chunks = []
    for choice in body.get("choices") or ():
        idx = choice.get("index", 0)
        message = choice.get("message") or {}
        delta: dict[str, Any] = {"role": message.get("role", "assistant"), "content": message.get("content") or ""}
        if message.get("tool_calls"):
            delta["tool_calls"] = [{**tc, "index": i} for i, tc in enumerate(message["tool_calls"])]
        if message.get("refusal"):
            delta["refusal"] = message["refusal"]
        for key in (*REASONING_MEMBERS, "thinking_blocks"):
            if message.get(key):
                delta[key] = message[key]
        # The answer's log probabilities ride on the chunk of its content, whole (a stream spreads them over its
        # chunks; merged back they are the same list).
        chunks.append({**base, "choices": [{"index": idx, "delta": delta, "logprobs": choice.get("logprobs"),
                                            "finish_reason": None}]})
        finish = {"index": idx, "delta": {}, "logprobs": None, "finish_reason": choice.get("finish_reason") or "stop"}
        if choice.get("stop_reason") is not None:
            finish["stop_reason"] = choice["stop_reason"]
        chunks.append({**base, "choices": [finish]})
    if include_usage and body.get("usage"):
        chunks.append({**base, "choices": [], "usage": body["usage"]})
    return chunks


def finish_chunk(template: dict[str, Any] | None, finish_reason: str, endpoint: str = "chat.completions",
                 choices: int = 1) -> dict[str, Any]:
    """A final chunk ending every choice (``choices``, the request's ``n``) with ``finish_reason``, carrying the
    stream's id/model when known, in the stream's shape: ``chat.completion.chunk``, or ``text_completion`` for
    ``/v1/completions`` (``endpoint``, or the template's own ``object``)."""
    template = template or {}
    text = template.get("object") == "text_completion" or (not template and endpoint == "completions")
    if text:
        parts = [{"text": "", "index": i, "logprobs": None, "finish_reason": finish_reason} for i in range(choices)]
    else:
        parts = [{"index": i, "delta": {}, "logprobs": None, "finish_reason": finish_reason} for i in range(choices)]
    return {
        "id": template.get("id") or new_id("cmpl" if text else "chatcmpl"),
        "object": "text_completion" if text else "chat.completion.chunk",
        "created": template.get("created") or int(time.time()),
        "model": template.get("model"),
        "choices": parts,
    }


def stopped_answer(endpoint: str, answer: Any, finish_reason: str) -> dict[str, Any]:
    """A non-stream answer an ``on_response`` hook stopped (``StopStream``): no content, ``finish_reason`` given,
    in the endpoint's shape (``chat.completion``, or ``text_completion`` for ``/v1/completions``). ``answer`` is
    the upstream's answer when there is one: its id, creation time, model, fingerprint and usage are kept (the
    tokens were spent)."""
    answer = answer if isinstance(answer, dict) else {}
    completions = endpoint == "completions"
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
    if completions:
        choice["text"] = ""
    else:
        choice["message"] = {"role": "assistant", "content": None}
    out: dict[str, Any] = {
        "id": answer.get("id") or new_id("cmpl" if completions else "chatcmpl"),
        "object": "text_completion" if completions else "chat.completion",
        "created": answer.get("created") or int(time.time()),
        "model": answer.get("model"),
        "choices": [choice],
    }
    for key in ("system_fingerprint", "usage"):
        if answer.get(key) is not None:
            out[key] = answer[key]
    return out
