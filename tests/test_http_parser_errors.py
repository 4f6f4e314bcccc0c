"""Requests aiohttp's HTTP parser rejects (before any handler runs) get the gateway's OpenAI-format error.

Each request goes over a raw socket to a real gateway on 127.0.0.1: the status, the JSON body, the generated
``X-Request-ID``, the closed connection, no echo of the client's bytes, and no ERROR traceback from
``aiohttp.server`` (one ``bad_http_request`` info line on ``ssegate.http`` instead).
"""
from __future__ import annotations

import asyncio
import gzip
import logging
import re

import aiohttp
import orjson
import pytest
from aiohttp import compression_utils, web
from aiohttp.http_exceptions import BadHttpMessage
from structlog.testing import capture_logs

from proxy.testing import config_for
from proxy.web_app import start_server
from tests.helpers import CHAT

MARK = b"zqxj"  # client bytes aiohttp used to quote back in its text/plain answers


def _no_codec(encoding: str) -> bool:
    """True when aiohttp knows ``encoding`` but lacks its library (then the parser rejects the request)."""
    flag = {"br": "HAS_BROTLI", "zstd": "HAS_ZSTD"}[encoding]
    return hasattr(compression_utils, flag) and not getattr(compression_utils, flag)


def _post(headers: bytes, body: bytes) -> bytes:
    return b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + headers + \
        b"\r\n" + body


BAD_REQUESTS = [
    pytest.param(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + MARK * 5000 + b"\r\n\r\n",
                 431, "headers_too_large", id="header-value-20KB"),
    pytest.param(b"GET /health HTTP/1.1\r\nHost: x\r\nX-" + MARK * 2500 + b": v\r\n\r\n",
                 431, "headers_too_large", id="header-name-10KB"),
    pytest.param(b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%s-%d: v\r\n" % (MARK, i) for i in range(200))
                 + b"\r\n", 431, "headers_too_large", id="200-headers"),
    pytest.param(b"GET /" + MARK * 2500 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "url_too_long", id="url-10KB"),
    pytest.param(_post(b"Content-Encoding: br\r\nContent-Length: 6\r\n", MARK + b"{}"),
                 415, "unsupported_content_encoding", id="content-encoding-br",
                 marks=pytest.mark.skipif(not _no_codec("br"), reason="aiohttp decodes br here")),
    pytest.param(_post(b"Content-Encoding: zstd\r\nContent-Length: 6\r\n", MARK + b"{}"),
                 415, "unsupported_content_encoding", id="content-encoding-zstd",
                 marks=pytest.mark.skipif(not _no_codec("zstd"), reason="aiohttp decodes zstd here")),
    pytest.param(_post(b"Transfer-Encoding: chunked\r\n", MARK + b"\r\n{}\r\n0\r\n\r\n"),
                 400, "bad_http_request", id="invalid-chunk-size"),
    pytest.param(_post(b"Content-Length: 2\r\nContent-Length: 2\r\nX-" + MARK + b": 1\r\n", b"{}"),
                 400, "bad_http_request", id="duplicate-content-length"),
    pytest.param(_post(b"Content-Length: -1\r\nX-" + MARK + b": 1\r\n", b"{}"),
                 400, "bad_http_request", id="negative-content-length"),
]


async def exchange(port: int, data: bytes, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes and read until the server closes (a timeout fails: the connection must be closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, raw[:200]
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    assert len(body) == int(headers["content-length"])
    return status, headers, body


@pytest.fixture
async def gw(upstream, gateway_factory):
    return await gateway_factory(config_for(upstream))


@pytest.mark.parametrize("request_bytes,status,code", BAD_REQUESTS)
async def test_parser_rejection_is_an_openai_error(gw, upstream, caplog, request_bytes, status, code):
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    with capture_logs() as logs:
        got_status, headers, body = await exchange(gw.port, request_bytes)
    assert got_status == status
    assert headers["content-type"].startswith("application/json")
    assert re.fullmatch(r"[0-9a-f]{32}", headers.get("x-request-id", ""))
    err = orjson.loads(body)
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["type"] == "invalid_request_error"
    assert err["error"]["code"] == code and err["error"]["param"] is None
    assert 0 < len(err["error"]["message"]) < 120
    for leak in (MARK, b"b'", b"bytearray", b"Traceback"):
        assert leak not in body
    assert upstream.requests == []

    # One structured info line naming the status, no traceback from aiohttp.
    lines = [e for e in logs if e["event"] == "bad_http_request"]
    assert len(lines) == 1, logs
    assert lines[0]["log_level"] == "info"
    assert lines[0]["status"] == status and lines[0]["code"] == code
    assert lines[0]["request_id"] == headers["x-request-id"]
    assert MARK.decode() not in repr(lines[0])
    assert [r for r in caplog.records if r.name.startswith("aiohttp") and r.levelno >= logging.WARNING] == []


async def test_normal_requests_still_work(gw, caplog):
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    status, headers, body = await exchange(gw.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 200 and headers["x-request-id"]
    assert orjson.loads(body)["status"] in ("healthy", "degraded")
    async with aiohttp.ClientSession() as s:
        # Headers just under the limit and a gzip body (a Content-Encoding aiohttp decodes) are fine.
        headers = {"X-Big": "a" * 8000, "Content-Encoding": "gzip", "Content-Type": "application/json"}
        async with s.post(gw.base_url + "/chat/completions", data=gzip.compress(orjson.dumps(CHAT)),
                          headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["X-Request-ID"]
            assert (await resp.json())["choices"][0]["message"]["content"]
    assert [r for r in caplog.records if r.name.startswith("aiohttp") and r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize("raised", [RuntimeError("boom"), BadHttpMessage("raised by a handler")],
                         ids=["RuntimeError", "BadHttpMessage"])
async def test_handler_bugs_still_log_errors(caplog, raised):
    """Only the parser's rejections change: an exception escaping a handler is still aiohttp's 500 and ERROR
    traceback (the gateway's own handlers never let one escape; this is a bare app on the same runner)."""
    async def broken(request: web.Request) -> web.Response:
        raise raised

    app = web.Application()
    app.router.add_get("/", broken)
    runner, port = await start_server(app, "127.0.0.1", 0)
    try:
        with capture_logs() as logs:
            status, _, _ = await exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    finally:
        await runner.cleanup()
    assert status == 500
    assert not [e for e in logs if e["event"] == "bad_http_request"]
    errors = [r for r in caplog.records if r.name == "aiohttp.server" and r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info and errors[0].exc_info[1] is raised
