"""The one middleware: request id, and every HTTP error as an OpenAI-format error body."""
from __future__ import annotations

from typing import Any, Awaitable, Callable

import orjson
import structlog
import structlog.contextvars
from aiohttp import web

from . import ids
from .config.schema import CorsConfig
from .errors import GatewayError, error_body

__all__ = ["gateway_middleware", "add_request_id_header", "cors_middleware", "add_cors_headers",
           "REQUEST_ID_HEADER"]

REQUEST_ID_HEADER = "X-Request-ID"
log = structlog.get_logger("ssegate.http")

_HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def _request_id(request: web.Request) -> str:
    given = request.headers.get(REQUEST_ID_HEADER)
    if given and len(given) <= 128 and given.isprintable():
        return given
    return ids.request_id()


def _http_error(exc: web.HTTPException) -> web.Response:
    status = exc.status
    if status == 404:
        message = "Unknown request URL. Please check the URL and method."
    elif status == 413:
        message = "Request body is larger than the configured limit (server.max_request_size)."
    else:
        message = exc.reason or exc.text or "HTTP error"
    err = GatewayError(status, message, code=_HTTP_ERROR_CODES.get(status))
    headers = {}
    if status == 405 and "Allow" in exc.headers:
        headers["Allow"] = exc.headers["Allow"]
    resp = web.Response(body=orjson.dumps(err.to_dict()), status=status, content_type="application/json")
    resp.headers.update(headers)
    return resp


def _trace_id(request: web.Request) -> str:
    """The W3C trace id of ``traceparent`` (``00-<32 hex>-<16 hex>-<2 hex>``), or a new one."""
    header = request.headers.get("traceparent")
    if header and len(header) == 55 and header[2] == "-" and header[35] == "-":
        trace = header[3:35]
        if trace != "0" * 32:
            try:
                int(trace, 16)
                return trace
            except ValueError:
                pass
    return ids.trace_id()


@web.middleware
async def gateway_middleware(request: web.Request,
                             handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    request_id = request["request_id"] = _request_id(request)
    trace_id = request["trace_id"] = _trace_id(request)
    # Every log line of this request (this handler task's context) carries both ids.
    structlog.contextvars.bind_contextvars(request_id=request_id, trace_id=trace_id)
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _http_error(exc)
    except GatewayError as exc:
        return web.Response(body=exc.to_json(), status=exc.status, content_type="application/json",
                            headers=exc.headers)
    except Exception as exc:  # a bug: never a bare traceback page
        log.error("unhandled_error", path=request.path, error=repr(exc), exc_info=exc)
        return web.Response(body=orjson.dumps(error_body("Internal server error", "server_error", None,
                                                         "internal_error")),
                            status=500, content_type="application/json")


def cors_middleware(config: CorsConfig) -> Any:
    """CORS for browser front ends: preflight answers and the headers of actual responses."""
    any_origin = "*" in config.allow_origins
    allowed = frozenset(config.allow_origins)
    allow_headers = ", ".join(config.allow_headers)

    def origin_ok(origin: str) -> bool:
        return any_origin or origin in allowed

    @web.middleware
    async def cors(request: web.Request,
                   handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is None:
            return await handler(request)
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            if not origin_ok(origin):
                err = GatewayError(403, f"Origin {origin!r} is not allowed.", code="cors_origin_not_allowed")
                return web.Response(body=err.to_json(), status=403, content_type="application/json")
            headers = {
                "Access-Control-Allow-Origin": origin if (config.allow_credentials or not any_origin) else "*",
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": allow_headers,
                "Access-Control-Max-Age": str(config.max_age),
                "Vary": "Origin",
            }
            if config.allow_credentials:
                headers["Access-Control-Allow-Credentials"] = "true"
            return web.Response(status=204, headers=headers)
        if origin_ok(origin):
            request["cors_origin"] = origin if (config.allow_credentials or not any_origin) else "*"
        return await handler(request)

    return cors


def add_cors_headers(config: CorsConfig) -> Any:
    """on_response_prepare: CORS headers on actual responses (streams included) for allowed origins."""
    expose = ", ".join(config.expose_headers)

    async def add(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.get("cors_origin")
        if origin is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = expose
            response.headers["Vary"] = "Origin"
            if config.allow_credentials:
                response.headers["Access-Control-Allow-Credentials"] = "true"

    return add


async def add_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response carries the request id."""
    rid = request.get("request_id")
    if rid is not None:
        response.headers[REQUEST_ID_HEADER] = rid
