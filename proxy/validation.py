"""Validation of OpenAI-format request bodies (cheap type checks; the provider validates the rest)."""
from __future__ import annotations

import time
from typing import Any

import orjson

from .errors import bad_request
from .exchange import Exchange

__all__ = ["validate", "models_body", "translate_anthropic_ingress"]


def _require(cond: bool, message: str, param: str) -> None:
    if not cond:
        raise bad_request(message, param=param, code="invalid_value" if param else None)


def _check_common(body: dict[str, Any]) -> None:
    model = body.get("model")
    if model is None:
        raise bad_request("you must provide a model parameter", param="model", code="missing_required_parameter")
    _require(isinstance(model, str) and model != "", "'model' must be a non-empty string", "model")
    stream = body.get("stream", False)
    _require(stream is None or isinstance(stream, bool), "'stream' must be a boolean", "stream")
    if "stream_options" in body and body["stream_options"] is not None:
        _require(isinstance(body["stream_options"], dict), "'stream_options' must be an object", "stream_options")
        _require(bool(stream), "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                 "stream_options")
    for key in ("max_tokens", "max_completion_tokens", "n"):
        value = body.get(key)
        if value is not None:
            _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                     f"'{key}' must be a positive integer", key)
    for key, low, high in (("temperature", 0, 2), ("top_p", 0, 1)):
        value = body.get(key)
        if value is not None:
            _require(isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high,
                     f"'{key}' must be a number between {low} and {high}", key)


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
    exchange.json = body
    _check_common(body)
    endpoint = exchange.endpoint
    if endpoint == "chat.completions":
        messages = body.get("messages")
        if messages is None:
            raise bad_request("Missing required parameter: 'messages'.", param="messages",
                              code="missing_required_parameter")
        _require(isinstance(messages, list) and len(messages) > 0, "'messages' must be a non-empty array", "messages")
        for i, m in enumerate(messages):
            _require(isinstance(m, dict) and isinstance(m.get("role"), str),
                     f"'messages[{i}]' must be an object with a string 'role'", f"messages[{i}]")
    elif endpoint == "completions":
        prompt = body.get("prompt")
        if prompt is None:
            raise bad_request("Missing required parameter: 'prompt'.", param="prompt", code="missing_required_parameter")
        _require(isinstance(prompt, (str, list)), "'prompt' must be a string or an array", "prompt")
    elif endpoint == "embeddings":
        value = body.get("input")
        if value is None:
            raise bad_request("Missing required parameter: 'input'.", param="input", code="missing_required_parameter")
        _require(isinstance(value, (str, list)) and value != [] and value != "",
                 "'input' must be a non-empty string or array", "input")
        _require(not body.get("stream"), "embeddings cannot be streamed", "stream")
    exchange.model = body["model"]
    exchange.stream = bool(body.get("stream"))
    opts = body.get("stream_options")
    exchange.include_usage = bool(exchange.stream and isinstance(opts, dict) and opts.get("include_usage"))


def models_body(names: list[str]) -> bytes:
    created = int(time.time())
    return orjson.dumps({"object": "list", "data": [
        {"id": name, "object": "model", "created": created, "owned_by": "ssegate"} for name in names]})


def translate_anthropic_ingress(exchange: Exchange) -> None:
    """``/v1/messages``: check the Anthropic-format body, then replace it by its OpenAI translation, so the
    pipeline and every plugin see one format. The answer is translated back on the way out."""
    from .anthropic_format import from_anthropic_request

    try:
        body = orjson.loads(exchange.body) if exchange.body else None
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"We could not parse the JSON body of your request: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    for key, kind in (("model", str), ("max_tokens", int), ("messages", list)):
        if body.get(key) is None:
            raise bad_request(f"{key}: Field required", param=key, code="missing_required_parameter")
        _require(isinstance(body[key], kind) and not isinstance(body[key], bool), f"{key}: invalid type", key)
    _require(body["max_tokens"] >= 1, "max_tokens: must be at least 1", "max_tokens")
    translated = from_anthropic_request(body)
    if translated.get("stream"):
        # The Anthropic stream reports usage at the end: ask for the usage chunk, the egress consumes it.
        translated["stream_options"] = {"include_usage": True}
    exchange.body = orjson.dumps(translated)
