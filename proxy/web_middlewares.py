"""The request's edge: request and trace ids, every HTTP error as an OpenAI-format error body, CORS."""
from __future__ import annotations

import functools
from typing import Any, Awaitable, Callable

import orjson
import structlog
from aiohttp import web
from multidict import istr

from . import ids
from .config.schema import CorsConfig
from .errors import GatewayError, error_body
from .log import request_context

__all__ = ["begin", "edge", "error_for", "unmatched_route", "cors_middleware", "add_cors_headers",
           "REQUEST_ID_HEADER"]

REQUEST_ID_HEADER = "X-Request-ID"
log = structlog.get_logger("ssegate.http")

_HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


# Header names as istr: a case-insensitive lookup that need not fold the name on every request.
_REQUEST_ID_KEY = istr(REQUEST_ID_HEADER)
_TRACEPARENT_KEY = istr("traceparent")


def _given_request_id(request: web.Request) -> str | None:
    given = request.headers.get(_REQUEST_ID_KEY)
    if given and len(given) <= 128 and given.isprintable():
        return given
    return None


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


def _given_trace_id(request: web.Request) -> str | None:
    """The W3C trace id of ``traceparent`` (``00-<32 hex>-<16 hex>-<2 hex>``), if the request has a valid one."""
    header = request.headers.get(_TRACEPARENT_KEY)
    if header and len(header) == 55 and header[2] == "-" and header[35] == "-":
        trace = header[3:35]
        if trace != "0" * 32:
            try:
                int(trace, 16)
                return trace
            except ValueError:
                pass
    return None


def begin(request: web.Request) -> tuple[str, str]:
    """The request id and W3C trace id of a request (given or new), bound to every log line of its task.

    A request that brings neither gets one new id for both: a new trace is as unique as a request id."""
    request_id = _given_request_id(request)
    trace_id = _given_trace_id(request)
    if trace_id is None:
        trace_id = ids.trace_id()
        if request_id is None:
            request_id = trace_id
    elif request_id is None:
        request_id = ids.request_id()
    request_context.set((request_id, trace_id))
    return request_id, trace_id


def error_for(request: web.Request, exc: BaseException) -> web.Response:
    """The OpenAI-format error response for an exception that escaped a handler."""
    if isinstance(exc, web.HTTPException) and exc.status >= 400:
        return _http_error(exc)
    if isinstance(exc, GatewayError):
        return web.Response(body=exc.to_json(), status=exc.status, content_type="application/json",
                            headers=exc.headers)
    log.error("unhandled_error", path=request.path, error=repr(exc), exc_info=exc)  # a bug: never a traceback page
    return web.Response(body=orjson.dumps(error_body("Internal server error", "server_error", None, "internal_error")),
                        status=500, content_type="application/json")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def edge(handler: Handler) -> Handler:
    """Wrap a handler (not on the API hot path) with what an aiohttp middleware would do: the request id (in
    ``request["request_id"]`` and the ``X-Request-ID`` header), the trace id, and OpenAI-format errors. The API
    handlers do the same inline; with no middleware aiohttp adds no frame to every request."""
    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        request_id, request["trace_id"] = begin(request)
        request["request_id"] = request_id
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = error_for(request, exc)
        except Exception as exc:
            response = error_for(request, exc)
        if not response.prepared:
            response.headers[REQUEST_ID_HEADER] = request_id
        return response

    return wrapped


def unmatched_route(known: dict[str, set[str]]) -> Handler:
    """The catch-all handler: 405 (with ``Allow``) for a known path and another method, else 404.

    Under ``/v1/messages`` (the Anthropic ingress) the error body is Anthropic's (``not_found_error``, and
    ``invalid_request_error`` for 405), so an Anthropic client reads it as it reads the API's other errors."""
    from .anthropic_format import anthropic_error_body

    def anthropic_error(status: int, message: str, allow: list[str] | None = None) -> web.Response:
        body = anthropic_error_body(status, message)
        if status == 405:
            body["error"]["type"] = "invalid_request_error"  # Anthropic has no type of its own for 405
        response = web.Response(body=orjson.dumps(body), status=status, content_type="application/json")
        if allow is not None:
            response.headers["Allow"] = ", ".join(allow)
        return response

    async def unmatched(request: web.Request) -> web.StreamResponse:
        path = request.path
        methods = known.get(path)
        anthropic = path == "/v1/messages" or path.startswith("/v1/messages/")
        if methods and request.method not in methods:
            if anthropic:
                allow = sorted(methods)
                return anthropic_error(405, f"Method {request.method} is not allowed on {path} "
                                            f"(allowed: {', '.join(allow)}).", allow)
            raise web.HTTPMethodNotAllowed(request.method, sorted(methods))
        if anthropic:
            return anthropic_error(404, "Unknown request URL. Please check the URL and method.")
        raise web.HTTPNotFound()

    return unmatched


def _header_matcher(allow_headers: tuple[str, ...]) -> Callable[[str], str | None]:
    """Compile ``cors.allow_headers`` (exact names, and patterns ending in ``*``; a lone ``*`` allows any) into
    a function mapping one requested header name to the name to echo, or None when it is not allowed.

    Matching is case-insensitive. An exact entry echoes its configured spelling, anything else the name as
    requested (header names are case-insensitive to browsers)."""
    any_header = "*" in allow_headers
    exact = {name.lower(): name for name in allow_headers if not name.endswith("*")}
    prefixes = tuple(name[:-1].lower() for name in allow_headers if name.endswith("*") and name != "*")

    def match(requested: str) -> str | None:
        folded = requested.lower()
        spelled = exact.get(folded)
        if spelled is not None:
            return spelled
        if any_header or folded.startswith(prefixes):
            return requested
        return None

    return match


def cors_middleware(config: CorsConfig) -> Any:
    """CORS for browser front ends: preflight answers and the headers of actual responses.

    A preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) is answered here, with an
    ``X-Request-ID`` like every response: 204 for an allowed origin, whose ``Access-Control-Allow-Headers``
    echoes the requested headers that ``allow_headers`` allows (a header it does not allow is left out, and the
    browser then refuses the request); an OpenAI-format 403 for any other origin."""
    any_origin = "*" in config.allow_origins
    allowed = frozenset(config.allow_origins)
    header_allowed = _header_matcher(config.allow_headers)
    max_age = str(config.max_age)

    def origin_ok(origin: str) -> bool:
        return any_origin or origin in allowed

    def preflight(request: web.Request, origin: str) -> web.Response:
        request_id, request["trace_id"] = begin(request)
        request["request_id"] = request_id
        if not origin_ok(origin):
            err = GatewayError(403, f"Origin {origin!r} is not allowed.", code="cors_origin_not_allowed")
            return web.Response(body=err.to_json(), status=403, content_type="application/json",
                                headers={REQUEST_ID_HEADER: request_id})
        echoed: dict[str, None] = {}  # ordered, without duplicates
        for value in request.headers.getall("Access-Control-Request-Headers", ()):
            for name in value.split(","):
                name = name.strip()
                if name:
                    spelled = header_allowed(name)
                    if spelled is not None:
                        echoed.setdefault(spelled, None)
        headers = {
            "Access-Control-Allow-Origin": origin if (config.allow_credentials or not any_origin) else "*",
            "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
            "Access-Control-Max-Age": max_age,
            "Vary": "Origin, Access-Control-Request-Headers",
            REQUEST_ID_HEADER: request_id,
        }
        if echoed:
            headers["Access-Control-Allow-Headers"] = ", ".join(echoed)
        if config.allow_credentials:
            headers["Access-Control-Allow-Credentials"] = "true"
        return web.Response(status=204, headers=headers)

    @web.middleware
    async def cors(request: web.Request,
                   handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is None:
            return await handler(request)
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return preflight(request, origin)
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
