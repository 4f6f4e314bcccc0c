"""Validation of OpenAI-format request bodies (cheap type checks; the provider validates the rest)."""
from __future__ import annotations

import time
from typing import Any

import orjson

from .errors import bad_request
from .exchange import Exchange

__all__ = ["validate", "models_body", "model_body", "model_object", "translate_anthropic_ingress",
           "anthropic_count_tokens_body"]


def _invalid(message: str, param: str) -> Exception:
    return bad_request(message, param=param, code="invalid_value" if param else None)


def _check_common(body: dict[str, Any]) -> None:
    # Conditions first, messages only on failure: this runs for every request. Only the optional keys the body
    # has are looked at (one set operation finds them).
    model = body.get("model")
    if model is None:
        raise bad_request("you must provide a model parameter", param="model", code="missing_required_parameter")
    if not isinstance(model, str) or model == "":
        raise _invalid("'model' must be a non-empty string", "model")
    if _CHECKED.isdisjoint(body):
        return
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise _invalid("'stream' must be a boolean", "stream")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise _invalid("'stream_options' must be an object", "stream_options")
        if not stream:
            raise _invalid("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                           "stream_options")
    for key in _POSITIVE_INTS.intersection(body):
        value = body[key]
        if value is not None and (type(value) is not int or value < 1):
            raise _invalid(f"'{key}' must be a positive integer", key)
    for key in _RANGES.keys() & body.keys():
        value = body[key]
        low, high = _RANGES[key]
        if value is not None and (type(value) not in (int, float) or not low <= value <= high):
            raise _invalid(f"'{key}' must be a number between {low} and {high}", key)


_POSITIVE_INTS = frozenset(("max_tokens", "max_completion_tokens", "n"))
_RANGES = {"temperature": (0, 2), "top_p": (0, 1)}
#: The optional keys _check_common looks at.
_CHECKED = frozenset(("stream", "stream_options", *_POSITIVE_INTS, *_RANGES))


def validate(exchange: Exchange) -> None:
    """Parse and check the body; fill ``model``, ``stream`` and ``include_usage``. Raises GatewayError 400."""
    if not exchange.body:
        raise bad_request("We could not parse the JSON body of your request: the body is empty.")
    try:
        body = orjson.loads(exchange.body)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"We could not parse the JSON body of your request: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    exchange._json = body  # the parse of exchange.body itself: no re-serialization
    _check_common(body)
    endpoint = exchange.endpoint
    if endpoint == "chat.completions":
        messages = body.get("messages")
        if messages is None:
            raise bad_request("Missing required parameter: 'messages'.", param="messages",
                              code="missing_required_parameter")
        if not isinstance(messages, list) or not messages:
            raise _invalid("'messages' must be a non-empty array", "messages")
        for m in messages:  # (no enumerate: half the cost of this loop, which runs once per message)
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                i = messages.index(m)
                raise _invalid(f"'messages[{i}]' must be an object with a string 'role'", f"messages[{i}]")
    elif endpoint == "completions":
        prompt = body.get("prompt")
        if prompt is None:
            raise bad_request("Missing required parameter: 'prompt'.", param="prompt", code="missing_required_parameter")
        if not isinstance(prompt, (str, list)):
            raise _invalid("'prompt' must be a string or an array", "prompt")
    elif endpoint == "embeddings":
        value = body.get("input")
        if value is None:
            raise bad_request("Missing required parameter: 'input'.", param="input", code="missing_required_parameter")
        if not isinstance(value, (str, list)) or value == [] or value == "":
            raise _invalid("'input' must be a non-empty string or array", "input")
        if body.get("stream"):
            raise _invalid("embeddings cannot be streamed", "stream")
    exchange.model = body["model"]
    if body.get("stream"):
        exchange.stream = True
        opts = body.get("stream_options")
        exchange.include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))


def model_object(name: str, created: int) -> dict[str, Any]:
    """One model object: an element of ``GET /v1/models``, and the answer of ``GET /v1/models/{model}``."""
    return {"id": name, "object": "model", "created": created, "owned_by": "ssegate"}


def models_body(names: list[str]) -> bytes:
    created = int(time.time())
    return orjson.dumps({"object": "list", "data": [model_object(name, created) for name in names]})


def model_body(name: str) -> bytes:
    """The body of ``GET /v1/models/{model}``: the object ``/v1/models`` lists for that name."""
    return orjson.dumps(model_object(name, int(time.time())))


def _anthropic_body(raw: bytes, require_max_tokens: bool) -> dict[str, Any]:
    """Parse and check an Anthropic Messages body (``max_tokens`` required by ``/v1/messages``, not by
    ``count_tokens``). Raises GatewayError 400."""
    try:
        body = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"We could not parse the JSON body of your request: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    required = (("model", str), ("max_tokens", int), ("messages", list)) if require_max_tokens else (
        ("model", str), ("messages", list))
    for key, kind in required:
        if body.get(key) is None:
            raise bad_request(f"{key}: Field required", param=key, code="missing_required_parameter")
        if not isinstance(body[key], kind) or isinstance(body[key], bool):
            raise _invalid(f"{key}: invalid type", key)
    if require_max_tokens and body["max_tokens"] < 1:
        raise _invalid("max_tokens: must be at least 1", "max_tokens")
    if not body["model"]:
        raise _invalid("model: must be a non-empty string", "model")
    if not body["messages"]:
        raise _invalid("messages: at least one message is required", "messages")
    for i, m in enumerate(body["messages"]):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _invalid(f"messages.{i}: must be an object with a string 'role'", f"messages.{i}")
        if m["role"] not in ("user", "assistant"):  # the system prompt is the top-level "system"
            raise _invalid(f"messages.{i}.role: must be 'user' or 'assistant' (the system prompt goes in the "
                           "top-level 'system')", f"messages.{i}.role")
    for key, kinds in (("system", (str, list)), ("tools", (list,))):
        if body.get(key) is not None and not isinstance(body[key], kinds):
            raise _invalid(f"{key}: invalid type", key)
    return body


def _from_anthropic(body: dict[str, Any]) -> dict[str, Any]:
    from .anthropic_format import from_anthropic_request

    try:
        return from_anthropic_request(body)
    except (AttributeError, TypeError):  # a block or tool that is not an object, deeper than the checks above
        raise _invalid("messages or tools: a content block or tool is not a valid object", "messages") from None


def translate_anthropic_ingress(exchange: Exchange) -> None:
    """``/v1/messages``: check the Anthropic-format body, then replace it by its OpenAI translation, so the
    pipeline and every plugin see one format. The answer is translated back on the way out."""
    from .anthropic_format import ANTHROPIC_EXTRAS, ANTHROPIC_ORIGINAL, anthropic_extras

    body = _anthropic_body(exchange.body, require_max_tokens=True)
    translated = _from_anthropic(body)
    extras = anthropic_extras(body)  # (thinking, top_k: for an anthropic provider only)
    if extras is not None:
        exchange.state[ANTHROPIC_EXTRAS] = extras
    if translated.get("stream"):
        # The Anthropic stream reports usage at the end: ask for the usage chunk, the egress consumes it.
        translated["stream_options"] = {"include_usage": True}
    exchange.body = orjson.dumps(translated)
    exchange.state[ANTHROPIC_ORIGINAL] = (exchange.body, body)


def anthropic_count_tokens_body(raw: bytes) -> dict[str, Any]:
    """``/v1/messages/count_tokens``: check the Anthropic-format body as ``/v1/messages`` does, less
    ``max_tokens`` (count_tokens takes none), and return the OpenAI translation of its prompt (system, messages,
    tools): what :func:`proxy.tokens.estimate_prompt_tokens` counts. Raises GatewayError 400."""
    body = _anthropic_body(raw, require_max_tokens=False)
    return _from_anthropic({key: body[key] for key in ("model", "system", "messages", "tools") if key in body})
