"""Anthropic Messages API behind the OpenAI-format pipeline: requests and answers are translated both ways
(``proxy/anthropic_format.py``), streams event by event, errors into OpenAI error bodies. What a Messages request
cannot carry (``n`` above 1, a JSON ``response_format``) is refused with a 400 before any upstream call."""
from __future__ import annotations

from typing import Any, AsyncIterator, Mapping

import aiohttp
import orjson

from ..anthropic_format import (
    ANTHROPIC_EXTRAS,
    ANTHROPIC_ORIGINAL,
    AnthropicStreamToOpenAI,
    from_anthropic_message,
    to_anthropic_request,
    unsupported_by_anthropic,
)
from ..sse import SSEParser
from ..upstream import UpstreamError, UpstreamRequest, UpstreamResponse, retry_headers
from .openai import OpenAIProvider, upstream_error_from_body

__all__ = ["AnthropicProvider"]

DEFAULT_VERSION = "2023-06-01"
_RETRYABLE = frozenset({408, 409, 429, 500, 502, 503, 504, 529})


class _AnthropicResponse(UpstreamResponse):
    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers = resp.headers

    async def read(self) -> bytes:
        message = orjson.loads(await self._resp.read())
        return orjson.dumps(from_anthropic_message(message))

    async def batches(self) -> AsyncIterator[list[bytes]]:
        parser = SSEParser()
        translate = AnthropicStreamToOpenAI()
        async for data in self._resp.content.iter_any():
            out: list[bytes] = []
            for event in parser.feed(data):
                out.extend(translate.feed(event))
            if out:
                yield out

    def close(self) -> None:
        self._resp.close()


#: Members of a translated request the gateway itself sets per attempt (the route's model; the usage the
#: OpenAI-format pipeline asks for, which Anthropic always sends): a change to them is no change of the request.
_PER_ATTEMPT = ("model", "stream_options")


def _client_request(request: UpstreamRequest) -> dict[str, Any] | None:
    """The ``/v1/messages`` client's own request, when what this attempt would send is still its translation
    (no plugin rewrote the body or edited the upstream request, no continuation): sent as it is, it keeps what
    the OpenAI format has no field for (``cache_control``, ``thinking``, ``top_k``, citations, ...). None
    otherwise (the translation of what changed goes, with the extras kept beside it)."""
    original = request.exchange.state.get(ANTHROPIC_ORIGINAL)
    if original is None or request.exchange.body is not original[0]:
        return None
    edited = request.edited
    if edited is not None:
        translated = request.exchange.json
        if {k: v for k, v in edited.items() if k not in _PER_ATTEMPT} != \
                {k: v for k, v in translated.items() if k not in _PER_ATTEMPT}:
            return None
    return original[1]  # type: ignore[no-any-return]


class AnthropicProvider(OpenAIProvider):
    reads_payload = True  # the request is translated from the parsed body

    def __init__(self, config) -> None:  # type: ignore[no-untyped-def]
        super().__init__(config)
        base = config.base_url.rstrip("/")
        self._url = base + ("/messages" if base.endswith("/v1") else "/v1/messages")
        self._models_url = base + ("/models" if base.endswith("/v1") else "/v1/models")
        self._headers["anthropic-version"] = config.api_version or DEFAULT_VERSION

    def auth_headers(self, key: str | None) -> dict[str, str]:
        return {"x-api-key": key} if key else {}

    def models_url(self) -> str:
        """Anthropic's model list (``{"data": [{"id": ...}, ...]}``, its first page)."""
        return self._models_url

    def url(self, request: UpstreamRequest) -> str:
        if request.exchange.endpoint != "chat.completions":
            raise UpstreamError(400, f"provider {self.name!r} (anthropic) serves chat completions only",
                                kind="unsupported", retryable=False, fallback=True, code="unsupported_endpoint")
        return self._url

    def body(self, request: UpstreamRequest) -> bytes:
        exchange = request.exchange
        own = _client_request(request) if exchange.ingress == "anthropic" else None
        if own is not None:
            return orjson.dumps({**own, "model": request.route.model})
        body: Any = request.payload
        refused = unsupported_by_anthropic(body)
        if refused is not None:
            # (as an unsupported endpoint: another route may serve it, no retry here; else the client gets this 400)
            param, reason = refused
            raise UpstreamError(400, f"provider {self.name!r} (anthropic) {reason}", kind="unsupported",
                                retryable=False, fallback=True, param=param, code="unsupported_value")
        extras = exchange.state.get(ANTHROPIC_EXTRAS) if exchange.ingress == "anthropic" else None
        translated = to_anthropic_request({**body, "model": request.route.model}, self.config.max_tokens_default,
                                          extras)
        return orjson.dumps(translated)

    def error_from(self, status: int, body: bytes, headers: Mapping[str, str]) -> UpstreamError:
        try:
            parsed = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            err = parsed["error"]
            out_status = 503 if status == 529 else status
            extra = retry_headers(headers)
            openai_body = {"error": {"message": str(err.get("message") or "upstream error"),
                                     "type": err.get("type") or "api_error", "param": None,
                                     "code": err.get("type")}}
            return UpstreamError(out_status, openai_body["error"]["message"], kind="status",
                                 retryable=status in _RETRYABLE, body=openai_body, code=err.get("type"),
                                 headers=extra)
        return upstream_error_from_body(status, body, self.name, headers)

    def wrap(self, resp: aiohttp.ClientResponse, request: UpstreamRequest) -> UpstreamResponse:
        return _AnthropicResponse(resp)
