"""Requests aiohttp's HTTP parser rejects, answered in the OpenAI error format.

A request the parser rejects (a header over 8190 bytes, an unsupported Content-Encoding, a bad chunk size, ...)
never reaches a handler: aiohttp answers it itself from ``RequestHandler.handle_error`` (text/plain, quoting the
client's bytes, no request id) and logs a traceback at ERROR on ``aiohttp.server``. aiohttp has no option for
that answer, so the gateway's connections use a RequestHandler subclass whose ``handle_error`` answers parser
errors in the OpenAI error format (:func:`with_json_parser_errors`, used by
:class:`proxy.web_runner.GatewayRunner`). Only that error path differs: the class is chosen once per connection,
and no request goes through anything more than with aiohttp's own RequestHandler.
"""
from __future__ import annotations

import asyncio
import re
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, ContentEncodingError, HttpProcessingError, LineTooLong

from . import ids
from .errors import GatewayError
from .web_middlewares import REQUEST_ID_HEADER

__all__ = ["with_json_parser_errors", "bad_http_request"]

http_log = structlog.get_logger("ssegate.http")

# The start of a request line, ``METHOD SP``; a header line starts ``name:`` (a name has no space).
_REQUEST_LINE_START = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ ")


def _request_line_too_long(exc: LineTooLong) -> bool:
    """Whether a LineTooLong is about the request line (414) rather than a header (431).

    aiohttp raises the same exception for both, so this looks at where or what: its C parser raises it in the
    llhttp callback ``cb_on_url`` (a frame of the traceback), and its pure-Python parser (``AIOHTTP_NO_EXTENSIONS``)
    quotes the start of the line, ``METHOD SP target`` for a request line. Neither is a documented aiohttp
    contract; a wrong guess only turns a 414 into a 431."""
    tb = exc.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_name
        if name.endswith("cb_on_url"):
            return True
        if name.endswith(("cb_on_header_field", "cb_on_header_value")):
            return False
        tb = tb.tb_next
    line = exc.args[0] if exc.args else None
    return isinstance(line, (bytes, bytearray)) and _REQUEST_LINE_START.match(line) is not None


def _classify(exc: HttpProcessingError) -> tuple[int, str, str]:
    """Status, ``error.code`` and message for a parser error. The message never quotes the client's bytes
    (aiohttp's do)."""
    if isinstance(exc, LineTooLong):
        if _request_line_too_long(exc):
            return 414, "url_too_long", "The request line (method and URL) is longer than this server accepts."
        return 431, "headers_too_large", "A request header is longer than this server accepts."
    if isinstance(exc, BadHttpMessage) and exc.message == "Too many headers received":
        return 431, "headers_too_large", "The request has more headers than this server accepts."
    if isinstance(exc, ContentEncodingError):  # raised before any body byte: br or zstd without its library
        return (415, "unsupported_content_encoding",
                "The request body's Content-Encoding is not supported; send it uncompressed, gzip or deflate.")
    return 400, "bad_http_request", "Malformed HTTP request."


def bad_http_request(request: web.BaseRequest, exc: HttpProcessingError) -> web.Response:
    """The answer to a request aiohttp's HTTP parser rejected: the OpenAI error format, a new request id, the
    connection closed afterwards (as aiohttp does: the rest of the stream cannot be trusted), one log line."""
    status, code, message = _classify(exc)
    request_id = ids.request_id()
    http_log.info("bad_http_request", status=status, code=code, error=type(exc).__name__, peer=request.remote,
                  request_id=request_id)
    resp = web.Response(body=GatewayError(status, message, code=code).to_json(), status=status,
                        content_type="application/json", headers={REQUEST_ID_HEADER: request_id})
    resp.force_close()
    return resp


class _GatewayRequestHandler(web.RequestHandler):
    """aiohttp's connection handler, answering parser errors with :func:`bad_http_request`."""

    __slots__ = ()

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        # aiohttp calls this with 400 and the parser's exception for a malformed request (and with 500/504 for
        # what escaped a handler: a bug, which aiohttp's own handle_error logs as an error, left as is).
        if status >= 500 or not isinstance(exc, HttpProcessingError) or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        return bad_http_request(request, exc)


class _GatewayServer(web.Server):
    """A ``web.Server`` whose connections are :class:`_GatewayRequestHandler` (``web.Server`` has no option for
    the handler class; its ``__call__`` is the protocol factory the sites give the event loop)."""

    def __init__(self, handler: Any, *, request_factory: Any, handler_cancellation: bool,
                 loop: asyncio.AbstractEventLoop, **kwargs: Any) -> None:
        super().__init__(handler, request_factory=request_factory, handler_cancellation=handler_cancellation,
                         loop=loop, **kwargs)
        self._handler_loop = loop
        self._handler_kwargs = kwargs  # what web.Server passes to each RequestHandler

    def __call__(self) -> web.RequestHandler:
        try:
            return _GatewayRequestHandler(self, loop=self._handler_loop, **self._handler_kwargs)
        except TypeError:  # a kwarg RequestHandler does not take: aiohttp's own fallback
            return super().__call__()


def with_json_parser_errors(server: web.Server, handler: Any = None) -> web.Server:
    """``server`` rebuilt as a :class:`_GatewayServer` (same request factory and settings; the same request
    handler unless ``handler`` is given).

    PRIVATE aiohttp attributes, in this function only: ``Server._loop`` and ``Server._kwargs`` (the
    RequestHandler keyword arguments; aiohttp 3.x, read here against 3.14.5). If either is missing (another
    aiohttp), the server is returned unchanged: aiohttp's own text/plain 400s and its ERROR log line."""
    loop = getattr(server, "_loop", None)
    kwargs = getattr(server, "_kwargs", None)
    if type(server) is not web.Server or loop is None or not isinstance(kwargs, dict):
        return server
    return _GatewayServer(handler or server.request_handler, request_factory=server.request_factory,
                          handler_cancellation=server.handler_cancellation, loop=loop, **kwargs)
