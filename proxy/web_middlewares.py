"""The one middleware: request id, and every HTTP error as an OpenAI-format error body."""
from __future__ import annotations

import os
from typing import Awaitable, Callable

import orjson
import structlog
from aiohttp import web

from .errors import GatewayError, error_body

__all__ = ["gateway_middleware", "add_request_id_header", "REQUEST_ID_HEADER"]

REQUEST_ID_HEADER = "X-Request-ID"
log = structlog.get_logger("ssegate.http")

_HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def _request_id(request: web.Request) -> str:
    given = request.headers.get(REQUEST_ID_HEADER)
    if given and len(given) <= 128 and given.isprintable():
        return given
    return os.urandom(16).hex()


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


@web.middleware
async def gateway_middleware(request: web.Request,
                             handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    request["request_id"] = _request_id(request)
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


async def add_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response carries the request id."""
    rid = request.get("request_id")
    if rid is not None:
        response.headers[REQUEST_ID_HEADER] = rid
