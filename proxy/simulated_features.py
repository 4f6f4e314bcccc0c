"""The simulator's answers beyond one plain text: tool calls, several choices (``n``), log probabilities.

A chat request asking for any of these takes this path (the plain one stays the byte-template fast path of
:mod:`proxy.simulator`). The whole answer is planned first, as a list of *steps* (one event's worth of deltas per
choice), so the stream and the non-stream answer of one request agree:

- **Tool calls.** With ``tools`` and ``tool_choice`` other than ``"none"``, a choice calls a function instead of
  answering in text: the named one (``{"type": "function", "function": {"name": ...}}``), else the first; with
  ``"auto"`` (the default) only while the last message is not a tool's result, so an agent loop ends (call, the
  client runs the tool, then a text answer). The arguments are a sample of the function's JSON schema (each
  required property, or every property when none is required: an enum's first value, ``"sample <name>"`` for
  strings, 1, 1.0, true, [], a nested object), streamed in pieces; ``finish_reason`` is ``"tool_calls"``.
- **n.** ``n`` choices (at most 128, as OpenAI allows), each its own text (another offset of the corpus).
- **logprobs.** ``logprobs: true`` gives every content token a log probability, and ``top_logprobs: k`` (0-20)
  its k likeliest alternatives, the token itself first.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, AsyncIterator

import orjson

from .errors import GatewayError

if TYPE_CHECKING:
    from .simulator import Simulator, _Plan

__all__ = ["wants_features", "chat_answer", "chat_events"]

MAX_CHOICES = 128
MAX_TOP_LOGPROBS = 20
#: Characters of tool-call arguments per streamed piece.
ARGUMENT_PIECE = 12
#: Other tokens offered as alternatives in ``top_logprobs``.
_ALTERNATIVES = (" the", " a", " and", " of", " to", " in", " is", " it", " that", " for", " on", " with",
                 " as", " was", " at", " by", " this", " be", " or", " from", " an")


def wants_features(body: dict[str, Any]) -> bool:
    """Whether a chat request asks for more than one plain text answer."""
    return bool((body.get("tools") and body.get("tool_choice") != "none") or body.get("n") not in (None, 1)
                or body.get("logprobs") is True or body.get("top_logprobs") is not None)


def _choices(body: dict[str, Any]) -> int:
    n = body.get("n", 1)
    if n is None:
        return 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_CHOICES:
        raise GatewayError(400, f"'n' must be an integer from 1 to {MAX_CHOICES}.", param="n")
    return n


def _top_logprobs(body: dict[str, Any]) -> int | None:
    """None: no log probabilities; else how many alternatives per token."""
    if body.get("logprobs") is not True:
        if body.get("top_logprobs") is not None:
            raise GatewayError(400, "'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs")
        return None
    k = body.get("top_logprobs") or 0
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_TOP_LOGPROBS:
        raise GatewayError(400, f"'top_logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS}.",
                           param="top_logprobs")
    return k


def _tool_to_call(body: dict[str, Any]) -> dict[str, Any] | None:
    """The function a choice calls (its ``function`` object), or None to answer in text."""
    tools = [t["function"] for t in body.get("tools") or ()
             if isinstance(t, dict) and isinstance(t.get("function"), dict) and t["function"].get("name")]
    choice = body.get("tool_choice", "auto")
    if not tools or choice == "none":
        return None
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        named = [f for f in tools if f["name"] == name]
        if not named:
            raise GatewayError(400, f"tool_choice names the function {name!r}, which is not among 'tools'.",
                               param="tool_choice")
        return named[0]
    if choice == "required":
        return tools[0]
    messages = body.get("messages") or []
    last = messages[-1] if messages else None
    if isinstance(last, dict) and last.get("role") in ("tool", "function"):
        return None  # the tool answered: now the model answers in text
    return tools[0]


def sample_of(schema: Any, name: str = "value") -> Any:
    """A value that fits a JSON schema, as a model would fill it in."""
    if not isinstance(schema, dict):
        return f"sample {name}"
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "object" or (kind is None and "properties" in schema):
        properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        required = [k for k in schema.get("required") or () if k in properties] or list(properties)
        return {key: sample_of(properties[key], key) for key in required}
    if kind == "array":
        return []
    return {"integer": 1, "number": 1.0, "boolean": True, "null": None}.get(kind or "", f"sample {name}")


def _logprob(token: str, k: int, seed: int) -> dict[str, Any]:
    value = -round(0.01 + (seed % 97) / 200, 4)
    entry: dict[str, Any] = {"token": token, "logprob": value, "bytes": list(token.encode())}
    alternatives = [a for a in _ALTERNATIVES if a != token][: max(0, k - 1)]
    entry["top_logprobs"] = ([{"token": token, "logprob": value, "bytes": list(token.encode())}] + [
        {"token": a, "logprob": round(value - 1.5 - i * 0.7, 4), "bytes": list(a.encode())}
        for i, a in enumerate(alternatives)])[:k]
    return entry


class _Choice:
    """One choice's planned deltas (a step each), its finish reason and its completion tokens."""

    def __init__(self, index: int, steps: list[dict[str, Any]], finish_reason: str, tokens: int) -> None:
        self.index, self.steps, self.finish_reason, self.tokens = index, steps, finish_reason, tokens


def _plan_choices(sim: "Simulator", body: dict[str, Any], plan: "_Plan") -> list[_Choice]:
    from .simulator import _N_TOKENS, _Plan

    n, k = _choices(body), _top_logprobs(body)
    function = _tool_to_call(body)
    choices = []
    for i in range(n):
        if function is not None:
            arguments = orjson.dumps(sample_of(function.get("parameters"))).decode()
            call_id = sim._new_id("call_")[:29]
            steps: list[dict[str, Any]] = [{"tool_calls": [{"index": 0, "id": call_id, "type": "function",
                                                            "function": {"name": function["name"],
                                                                         "arguments": ""}}]}]
            steps += [{"tool_calls": [{"index": 0, "function": {"arguments": arguments[j:j + ARGUMENT_PIECE]}}]}
                      for j in range(0, len(arguments), ARGUMENT_PIECE)]
            choices.append(_Choice(i, steps, "tool_calls", max(1, (len(arguments) + 3) // 4)))
            continue
        own = _Plan(plan.model, (plan.start + 7 * i) % _N_TOKENS, plan.n, plan.finish_reason, plan.prompt_tokens)
        tokens = own.token_strings()
        steps = []
        for j, token in enumerate(tokens):
            step: dict[str, Any] = {"content": token}
            if k is not None:
                step["logprobs"] = _logprob(token, k, own.start + j)
            steps.append(step)
        choices.append(_Choice(i, steps, plan.finish_reason, len(tokens)))
    return choices


def _usage(plan: "_Plan", choices: list[_Choice]) -> dict[str, int]:
    completion = sum(c.tokens for c in choices)
    return {"prompt_tokens": plan.prompt_tokens, "completion_tokens": completion,
            "total_tokens": plan.prompt_tokens + completion}


def chat_answer(sim: "Simulator", body: dict[str, Any], plan: "_Plan", completion_id: str,
                created: int) -> dict[str, Any]:
    """The ``chat.completion`` object of a request :func:`wants_features` says is not plain."""
    logprobs = body.get("logprobs") is True
    out = []
    choices = _plan_choices(sim, body, plan)
    for choice in choices:
        message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
        calls = [s["tool_calls"][0] for s in choice.steps if "tool_calls" in s]
        if calls:
            call = dict(calls[0])
            call["function"] = {"name": call["function"]["name"],
                                "arguments": "".join(c["function"]["arguments"] for c in calls)}
            message["tool_calls"] = [{k: v for k, v in call.items() if k != "index"}]
        else:
            message["content"] = "".join(s["content"] for s in choice.steps)
        out.append({"index": choice.index, "message": message,
                    "logprobs": {"content": [s["logprobs"] for s in choice.steps], "refusal": None}
                    if logprobs and not calls else None,
                    "finish_reason": choice.finish_reason})
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": plan.model,
            "system_fingerprint": sim._fingerprint, "choices": out, "usage": _usage(plan, choices)}


async def chat_events(sim: "Simulator", body: dict[str, Any], plan: "_Plan", completion_id: str, created: int,
                      include_usage: bool) -> AsyncIterator[bytes]:
    """The raw SSE events of the stream of such a request: a role chunk per choice, then one chunk per step
    position holding every choice that has a step there (paced like the plain stream's tokens), a finish chunk
    per choice, the usage chunk when asked, ``[DONE]``."""
    from .sse import DONE

    choices = _plan_choices(sim, body, plan)
    base: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                            "model": plan.model, "system_fingerprint": sim._fingerprint}
    tail = {"usage": None} if include_usage else {}  # last, as OpenAI writes it

    def event(parts: list[dict[str, Any]]) -> bytes:
        return b"data: " + orjson.dumps({**base, "choices": parts, **tail})

    def part(index: int, delta: dict[str, Any], logprobs: Any = None, finish: str | None = None) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    yield event([part(c.index, {"role": "assistant", "content": None if "tool_calls" in (c.steps or [{}])[0]
                                else ""}) for c in choices])
    loop = asyncio.get_running_loop()
    deadline = sim._first_deadline(loop)
    for j in range(max((len(c.steps) for c in choices), default=0)):
        if j and sim._itl > 0.0:
            deadline += sim._jitter(sim._itl, sim._itl_spread)
        delay = deadline - loop.time()
        if delay > 0.0:
            await asyncio.sleep(delay)
        parts = []
        for c in choices:
            if j < len(c.steps):
                step = dict(c.steps[j])
                lp = step.pop("logprobs", None)
                parts.append(part(c.index, step, {"content": [lp], "refusal": None} if lp is not None else None))
        yield event(parts)
    for c in choices:
        yield event([part(c.index, {}, None, c.finish_reason)])
    if include_usage:
        yield b"data: " + orjson.dumps({**base, "choices": [], "usage": _usage(plan, choices)})
    yield DONE
