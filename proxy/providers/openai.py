"""Adapter for any OpenAI-compatible server (OpenAI, vLLM, Ollama, the ssegate simulator, ...)."""
from __future__ import annotations

import asyncio
import os
import zlib
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping

import aiohttp
import orjson

from .. import pool
from ..config.schema import ProviderConfig
from ..openai_format import body_to_chunks
from ..sse import DONE, SSEParser, encode_event
from ..upstream_sessions import SharedSessions, close_session, pool_key
from ..upstream import (Provider, UpstreamError, UpstreamRequest, UpstreamResponse, broken_answer,
                        retry_headers)

__all__ = ["OpenAIProvider", "HTTPResponse", "upstream_error_from_body"]

_RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
#: Seconds ``/v1/models`` waits for an upstream's own model list.
MODELS_TIMEOUT = 3.0


class HTTPResponse(UpstreamResponse):
    __slots__ = ("_resp", "read")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers = resp.headers
        #: The whole body: aiohttp's own ``read`` (no coroutine frame of ours around it).
        self.read = resp.read  # type: ignore[method-assign]

    async def batches(self) -> AsyncIterator[list[bytes]]:
        parser = SSEParser()
        feed = parser.feed
        async for data in self._resp.content.iter_any():
            events = feed(data)
            if events:
                yield events
        if parser.pending.strip():
            # A final event without its blank line: deliver it rather than lose it.
            yield [parser.pending.strip(b"\r\n")]

    def raw_sse(self) -> Callable[[], Awaitable[bytes]]:
        return self._resp.content.readany  # aiohttp's own read: b"" at the end

    def close(self) -> None:
        self._resp.close()


class DecodedHTTPResponse(HTTPResponse):
    """An event stream the upstream compressed although the gateway asked for ``identity`` (a proxy in between
    that compresses anyway): decompressed as it arrives (gzip or zlib ``deflate``)."""

    __slots__ = ()

    def raw_sse(self) -> Callable[[], Awaitable[bytes]]:
        return _Inflating(self._resp.content.readany).read


class _Inflating:
    """Reads of a compressed stream, decompressed (gzip or zlib, told apart by the data); ``b""`` at the end."""

    __slots__ = ("_read", "_inflater")

    def __init__(self, read: Callable[[], Awaitable[bytes]]) -> None:
        self._read = read
        self._inflater: Any = zlib.decompressobj(wbits=47)  # 32 + 15: a gzip or a zlib header

    async def read(self) -> bytes:
        inflater = self._inflater
        while inflater is not None:
            data = await self._read()
            if not data:
                self._inflater = None
                return inflater.flush()
            out = inflater.decompress(data)
            if out:
                return out
        return b""


#: Content-Encodings the gateway decodes when an upstream sends them despite ``Accept-Encoding: identity``.
DECODED_ENCODINGS = frozenset({"gzip", "x-gzip", "deflate"})


def decoded(body: bytes) -> bytes:
    """A whole answer as sent, or decompressed when it is gzip (by its magic bytes: an upstream that ignores
    ``Accept-Encoding: identity``). A body that does not decompress is returned as it is."""
    if body[:2] != b"\x1f\x8b":
        return body
    try:
        return zlib.decompress(body, wbits=31)
    except zlib.error:
        return body


class WholeAnswerAsStream(UpstreamResponse):
    """A complete answer to a stream request, from an upstream that ignored ``"stream": true``: relayed as the
    chunks a stream of it would carry (a chat answer split into its role-and-content and finish chunks, any
    other answer as one chunk), the usage chunk, and ``[DONE]``."""

    __slots__ = ("events",)

    def __init__(self, answer: dict[str, Any], headers: Mapping[str, str]) -> None:
        choices = answer.get("choices")
        chat = isinstance(choices, list) and any(isinstance(c, dict) and "message" in c for c in choices)
        chunks = body_to_chunks(answer, include_usage=True) if chat else [answer]
        self.events = [encode_event(orjson.dumps(c)) for c in chunks] + [DONE]
        self.headers = headers

    async def batches(self) -> AsyncIterator[list[bytes]]:
        yield self.events


def upstream_error_from_body(status: int, body: bytes, provider: str, headers: Mapping[str, str]) -> UpstreamError:
    """Build the error for a non-2xx upstream answer: an OpenAI-format body is kept (and completed to OpenAI's four
    members by :meth:`UpstreamError.to_dict`); the shapes other servers use (``{"error": "text"}``, vLLM's
    ``{"object": "error", "message": ...}``, FastAPI's ``{"detail": ...}``, ``{"message": ...}``) give their
    message, type and code; anything else (an HTML page) is quoted, shortened."""
    parsed: Any = None
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        pass
    extra = retry_headers(headers)
    retryable = status in _RETRYABLE_STATUS
    out_status = status if retryable or 400 <= status < 500 else 502
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        err = parsed["error"]
        code = err.get("code")
        return UpstreamError(
            out_status, str(err.get("message") or "upstream error"), kind="status", retryable=retryable,
            body=parsed, code=code if isinstance(code, str) else None, headers=extra,
        )
    message, code = _other_error_shape(parsed)
    if message is None:
        message = body[:200].decode("utf-8", "replace")
    return UpstreamError(out_status, f"provider {provider!r} answered HTTP {status}: {message}", kind="status",
                         retryable=retryable, code=code or "upstream_error", headers=extra)


def _other_error_shape(parsed: Any) -> tuple[str | None, str | None]:
    """(message, code) of the error bodies of OpenAI-compatible servers that are not OpenAI's shape."""
    if not isinstance(parsed, dict):
        return None, None
    message = parsed.get("error") if isinstance(parsed.get("error"), str) else None
    if message is None:
        for key in ("message", "detail"):
            value = parsed.get(key)
            if isinstance(value, str) and value:
                message = value
                break
            if value is not None and key == "detail":  # FastAPI's validation errors: a list of objects
                message = orjson.dumps(value)[:300].decode("utf-8", "replace")
                break
    code = parsed.get("code")
    return message, code if isinstance(code, str) else None


#: Errors of a POST whose connection was lost before an answer began (not a connection that could not be opened:
#: ``aiohttp.ClientConnectorError``, itself a ``ClientOSError``).
STALE_CONNECTION_ERRORS = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


class OpenAIProvider(Provider):
    """Bearer-key OpenAI wire format over a pooled ``aiohttp.ClientSession``."""

    reads_payload = False  # the client's bytes go out as they are (``body``)

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        self._base = config.base_url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None
        #: Where the session came from when the gateway shares its providers' sessions across reloads.
        self._sessions: SharedSessions | None = None
        self._headers = {"Content-Type": "application/json", "Accept-Encoding": "identity",
                         **self.auth_headers(self.api_key()), **config.headers}
        self._timeout = aiohttp.ClientTimeout(total=None, connect=config.connect_timeout)

    def api_key(self) -> str | None:
        c = self.config
        return c.api_key or (os.environ.get(c.api_key_env) if c.api_key_env else None)

    def auth_headers(self, key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def start(self, sessions: SharedSessions | None = None) -> None:
        if sessions is None:
            self._session = self._new_session()
        else:  # the predecessor's session (its open connections) when a reload left the pool as it was
            self._session = sessions.acquire(pool_key(self.config), self._new_session)
            self._sessions = sessions

    def _new_session(self) -> aiohttp.ClientSession:
        c = self.config
        connector = pool.connector(
            max_idle=c.max_keepalive_connections, limit=c.max_connections, limit_per_host=0,
            keepalive_timeout=c.keepalive_expiry, ttl_dns_cache=300,
        )
        # No cookie jar: a cookie one client's answer set must never ride on another client's request.
        return aiohttp.ClientSession(
            connector=connector, auto_decompress=False, timeout=self._timeout, skip_auto_headers=("User-Agent",),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    def models_url(self) -> str:
        return self._base + "/models"

    async def discover_models(self) -> list[str] | None:
        """``GET {base_url}/models`` with the provider's key: the ``id`` of each entry of its ``data``."""
        assert self._session is not None, "provider not started"
        headers = {k: v for k, v in self._headers.items() if k != "Content-Type"}
        timeout = aiohttp.ClientTimeout(total=MODELS_TIMEOUT, connect=self.config.connect_timeout)
        async with self._session.get(self.models_url(), headers=headers, timeout=timeout) as resp:
            if resp.status >= 400:
                raise UpstreamError(502, f"provider {self.name!r} answered HTTP {resp.status} to GET /models",
                                    kind="status", retryable=True)
            answer = orjson.loads(decoded(await resp.read()))
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list):
            raise UpstreamError(502, f"provider {self.name!r}: GET /models is not a model list", kind="protocol",
                                retryable=True)
        return [str(m["id"]) for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        sessions, self._sessions = self._sessions, None
        if sessions is not None:
            await sessions.release(pool_key(self.config), session)
        else:
            await close_session(session)

    def url(self, request: UpstreamRequest) -> str:
        return self._base + request.path

    def body(self, request: UpstreamRequest) -> bytes:
        return request.body

    def error_from(self, status: int, body: bytes, headers: Mapping[str, str]) -> UpstreamError:
        return upstream_error_from_body(status, body, self.name, headers)

    def wrap(self, resp: aiohttp.ClientResponse, request: UpstreamRequest) -> UpstreamResponse:
        return HTTPResponse(resp)

    async def _post_again(self, request: UpstreamRequest, headers: Mapping[str, str],
                          exc: Exception) -> aiohttp.ClientResponse:
        """The POST failed with ``exc``. If the connection was lost before any byte of an answer came back, send it
        once more: a pooled connection the upstream closed as the request went out (its keep-alive timeout ran
        out: uvicorn's, and so vLLM's, is 5 s) fails that way, and the upstream never answered it. aiohttp retries
        only idempotent methods; the LLM SDKs retry such POSTs too. Anything else, or a second failure, is the
        provider's connect error."""
        if not isinstance(exc, STALE_CONNECTION_ERRORS) or isinstance(exc, aiohttp.ClientConnectorError):
            raise self._connect_error(exc) from exc
        assert self._session is not None
        try:
            return await self._session.post(self.url(request), data=self.body(request), headers=headers)
        except (asyncio.TimeoutError, aiohttp.ClientError) as again:
            raise self._connect_error(again) from again

    def _connect_error(self, exc: Exception) -> UpstreamError:
        if isinstance(exc, asyncio.TimeoutError):
            return UpstreamError(504, f"provider {self.name!r}: connect timeout", kind="timeout", retryable=True,
                                 code="upstream_timeout")
        return UpstreamError(502, f"provider {self.name!r} could not be reached ({type(exc).__name__})",
                             kind="connect", retryable=True, code="upstream_connect_error", detail=str(exc))

    async def _status_error(self, resp: aiohttp.ClientResponse) -> UpstreamError:
        """The error for an answer with status >= 400 (its body read, the connection released)."""
        try:
            body = decoded(await resp.read())
        except aiohttp.ClientError:
            body = b""
        finally:
            resp.release()
        return self.error_from(resp.status, body, resp.headers)

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        assert self._session is not None, "provider not started"
        headers = self._headers if not request.headers else {**self._headers, **request.headers}
        try:
            resp = await self._session.post(self.url(request), data=self.body(request), headers=headers)
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            resp = await self._post_again(request, headers, exc)
        if resp.status >= 400:
            raise await self._status_error(resp)
        if request.stream:
            headers = resp.headers
            if not headers.get("Content-Type", "").startswith("text/event-stream"):
                return await self._not_an_event_stream(resp)
            if "Content-Encoding" in headers and headers["Content-Encoding"].lower() in DECODED_ENCODINGS \
                    and type(self).wrap is OpenAIProvider.wrap:
                return DecodedHTTPResponse(resp)
        return self.wrap(resp, request)

    async def _not_an_event_stream(self, resp: aiohttp.ClientResponse) -> UpstreamResponse:
        """A 2xx answer to a stream request that is not an event stream: a whole answer (the upstream ignored
        ``"stream": true``) is relayed as a stream; anything else is an error before the client saw a byte, so
        another route may answer."""
        ctype = resp.headers.get("Content-Type") or "no Content-Type"
        try:
            body = decoded(await resp.read())
        except aiohttp.ClientError as exc:
            raise broken_answer(self.name, exc) from exc
        finally:
            resp.release()
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            answer = None
        if isinstance(answer, dict) and isinstance(answer.get("choices"), list):
            return WholeAnswerAsStream(answer, resp.headers)
        if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
            err = answer["error"]
            raise UpstreamError(502, str(err.get("message") or "upstream error"), kind="status", retryable=True,
                                body=answer, code=err.get("code"))
        raise UpstreamError(502, f"provider {self.name!r} answered a stream request with {ctype}, not an event "
                            "stream", kind="protocol", retryable=True, code="upstream_error")

    async def complete(self, request: UpstreamRequest) -> bytes:
        """As ``send`` then ``read`` (with no response wrapper), unless this adapter translates answers. The post
        is written out here rather than shared with ``send`` through a helper coroutine: that frame would cost
        as much as the wrapper saves (measured with ``bench.instructions``)."""
        if type(self).wrap is not OpenAIProvider.wrap:
            return await super().complete(request)
        assert self._session is not None, "provider not started"
        headers = self._headers if not request.headers else {**self._headers, **request.headers}
        try:
            resp = await self._session.post(self.url(request), data=self.body(request), headers=headers)
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            resp = await self._post_again(request, headers, exc)
        if resp.status >= 400:
            raise await self._status_error(resp)
        try:
            content = resp.content
            if content.is_eof():  # the answer came with its headers: its connection is back in the pool already
                return content.read_nowait()
            return await resp.read()
        finally:
            if not resp.closed:  # (an answer read to its end closed itself, and released its connection)
                resp.close()
