"""Errors that become OpenAI-format error responses.

Every error a client sees has the body ``{"error": {"message", "type", "param", "code"}}``.
Plugins raise :class:`GatewayError` (or one of its helpers) to reject a request; the pipeline turns it into
the response with the right status, or into a final SSE error event once a stream has started.
"""
from __future__ import annotations

from typing import Any

import orjson

__all__ = [
    "GatewayError",
    "StopStream",
    "bad_request",
    "not_found",
    "error_body",
]

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class GatewayError(Exception):
    """An error with an HTTP status and an OpenAI-format body.

    ``headers`` are added to the error response (for example ``Retry-After``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())

    def __repr__(self) -> str:
        return f"GatewayError({self.status}, {self.message!r}, code={self.code!r})"


class RouteDeclined(GatewayError):
    """Raised by an ``upstream_request`` hook to pass over the route being tried, before anything is sent.

    The gateway records the attempt with ``error`` set to ``reason`` (in ``exchange.attempts``, the access line
    and the metrics, where it is a label value: keep it one fixed word), does not retry that route, and tries
    the next one. When no route is left, the client gets the first error of the request's attempts: this one,
    with its status, message and ``headers`` (``Retry-After``), if no earlier route failed otherwise. The
    built-in ``provider_limits`` plugin raises it for a provider at its ``rate_limit``; a budget or quota plugin
    can do the same.
    """

    def __init__(self, status: int, message: str, *, reason: str = "declined", type: str | None = None,
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, message, type=type, param=param, code=code, headers=headers)
        self.reason = reason


class StopStream(Exception):
    """Raised by an ``on_chunk`` hook to end a live stream cleanly.

    The gateway sends a final chunk with ``finish_reason`` (default ``"content_filter"``), the usage chunk when the
    client asked for ``stream_options.include_usage`` (estimated when the upstream had not counted yet), and
    ``data: [DONE]``.
    """

    def __init__(self, reason: str, finish_reason: str = "content_filter") -> None:
        super().__init__(reason)
        self.reason = reason
        self.finish_reason = finish_reason


def bad_request(message: str, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def not_found(message: str, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(404, message, param=param, code=code)
