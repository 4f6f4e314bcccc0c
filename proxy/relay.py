"""Writing answers to the client: live SSE relay, non-stream bodies, plugin replies, errors mid-stream.

The relay is the per-chunk hot path. Per upstream read it does: one clock read, a byte scan of each event for
``[DONE]``, ``"usage"`` and ``"error"`` (JSON is parsed only for the usage chunk and error events), the
``on_chunk`` chain only when a plugin implements it, and one write of everything the read produced.
"""
from __future__ import annotations

import asyncio
from time import monotonic
from typing import TYPE_CHECKING, Any, Callable

import orjson
from aiohttp import web
from multidict import CIMultiDict

from .errors import GatewayError, StopStream
from .exchange import Exchange, Outcome, Reply, Usage
from .anthropic_format import OpenAIStreamToAnthropic, anthropic_error, to_anthropic_message
from .openai_format import body_to_chunks, finish_chunk, merge_chunks
from .sse import DONE, Chunk, SSEParser, encode_event
from .upstream import UpstreamError, UpstreamResponse
from .watchdog import Guard

if TYPE_CHECKING:
    from .pipeline import Pipeline

__all__ = ["ClientStream", "relay_stream", "StreamBroken", "send_reply", "json_response", "error_response",
           "answer_body"]

_KEEPALIVE = b": keepalive\n\n"
#: The response header naming the provider that answered.
PROVIDER_HEADER = "x-ssegate-provider"
_DONE_FRAME = DONE + b"\n\n"
_SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


class StreamBroken(Exception):
    """The upstream stream failed after the attempt started (``ClientStream.content_sent`` says whether the
    client saw content, so whether another route may still answer)."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


def answer_body(exchange: Exchange, body: bytes) -> bytes:
    """A successful non-stream answer in the client's wire format (OpenAI, or Anthropic for /v1/messages)."""
    if exchange.ingress == "anthropic":
        return orjson.dumps(to_anthropic_message(orjson.loads(body)))
    return body


def error_payload(exchange: Exchange | None, error: GatewayError) -> bytes:
    if exchange is not None and exchange.ingress == "anthropic":
        return orjson.dumps(anthropic_error(error)[1])
    return orjson.dumps(error.to_dict())


def json_response(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """An ``application/json`` answer (a ``Content-Type`` among ``headers`` is replaced)."""
    try:  # the headers copied once, by aiohttp
        return web.Response(body=body, status=status, headers=headers, content_type="application/json")
    except ValueError:  # headers carry a Content-Type of their own
        merged = CIMultiDict(headers)
        merged["Content-Type"] = "application/json"
        return web.Response(body=body, status=status, headers=merged)


def error_response(error: GatewayError, headers: dict[str, str] | None = None,
                   exchange: Exchange | None = None) -> web.Response:
    merged = {**error.headers, **headers} if headers else error.headers
    if exchange is not None and exchange.ingress == "anthropic":
        # Anthropic's own status for its clients (an overloaded upstream is its 529), recorded as sent
        status, body = anthropic_error(error)
        exchange.status = status
        return json_response(orjson.dumps(body), status, merged)
    return json_response(error_payload(exchange, error), error.status, merged)


class EventStreamResponse(web.StreamResponse):
    """The client's event stream: its status line and headers go out with its first bytes (the first events, or a
    keepalive comment), in one write instead of two (aiohttp from 3.10; earlier ones send them at once)."""

    _send_headers_immediately = False


class ClientStream:
    """The client's event-stream response: committed (200 + headers) lazily, on first content or keepalive."""

    __slots__ = ("request", "exchange", "resp", "_prepare", "loop", "guard", "content_sent", "last_template",
                 "egress")

    def __init__(self, request: web.Request, exchange: Exchange,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.request = request
        self.exchange = exchange
        self.resp = EventStreamResponse(status=200, headers=_SSE_HEADERS)
        self._prepare: Any = None
        self.loop = loop or asyncio.get_running_loop()
        self.guard: Guard | None = None
        self.content_sent = False
        self.last_template: bytes | None = None  # last content event, to build a final chunk from when needed
        #: Translates OpenAI events into the client's wire format (Anthropic ``/v1/messages`` clients).
        self.egress: Any = OpenAIStreamToAnthropic() if exchange.ingress == "anthropic" else None

    @property
    def committed(self) -> bool:
        """True once the 200 status is decided (headers sent or being sent): errors then go in-band."""
        return self._prepare is not None

    async def ensure_prepared(self) -> None:
        if self._prepare is None:
            self._prepare = True
            self.resp.headers.update(self.exchange.response_headers)
            await self.resp.prepare(self.request)
        elif self._prepare is not True:
            await self._prepare

    def keepalive(self) -> None:
        """Called by the watchdog on an idle stream: commit the stream if needed and send a comment."""
        if self._prepare is True and not self.resp.prepared:
            return
        self.loop.create_task(self._keepalive())

    async def _keepalive(self) -> None:
        try:
            if self._prepare is None:
                # Committed before any content: who will answer is not known yet (this attempt may still time out
                # and another route answer), so the provider header is left out rather than name the wrong one.
                headers = self.exchange.response_headers
                self.resp.headers.update({k: v for k, v in headers.items() if k != PROVIDER_HEADER}
                                         if PROVIDER_HEADER in headers else headers)
                self._prepare = self.loop.create_task(self.resp.prepare(self.request))
            await self.ensure_prepared()
            await self.resp.write(_KEEPALIVE)
        except (ConnectionError, RuntimeError, AssertionError):
            pass  # the stream ended or the client left; the relay deals with it

    async def write_events(self, events: list[bytes]) -> None:
        if self._prepare is not True or not self.resp.prepared:
            await self.ensure_prepared()
        if self.egress is not None:
            events = [out for ev in events for out in self.egress.feed(ev)]
            if not events:
                return
        data = events[0] + b"\n\n" if len(events) == 1 else b"\n\n".join(events) + b"\n\n"
        self.exchange.bytes_sent += len(data)
        await self.resp.write(data)
        if self.guard is not None:
            self.guard.last_write = self.guard.last_event

    async def finish(self) -> web.StreamResponse:
        await self.ensure_prepared()
        await self.resp.write_eof()
        return self.resp

    async def fail(self, error: GatewayError) -> web.StreamResponse:
        """End a committed stream with an OpenAI-format error event and ``[DONE]``."""
        try:
            await self.write_events([encode_event(error.to_json()), DONE])
            await self.resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        return self.resp

    async def stop(self, stop: StopStream) -> web.StreamResponse:
        """End a stream cleanly with a final chunk carrying ``finish_reason``, the usage chunk when the client asked
        for one (``stream_options.include_usage``; estimated when the upstream had not counted yet), and
        ``[DONE]``."""
        template = None
        if self.last_template is not None:
            template = Chunk(self.last_template).json
        exchange = self.exchange
        n = exchange.json.get("n") if isinstance(exchange.json, dict) else None
        choices = n if isinstance(n, int) and not isinstance(n, bool) and 1 < n <= 128 else 1
        last = finish_chunk(template, stop.finish_reason, exchange.endpoint, choices)
        events = [encode_event(orjson.dumps(last))]
        usage = exchange.usage or _estimated_usage(exchange)
        if usage is not None and exchange.include_usage:
            events.append(encode_event(orjson.dumps({
                "id": last["id"], "object": last["object"], "created": last["created"], "model": last["model"],
                "choices": [], "usage": {"prompt_tokens": usage.prompt_tokens,
                                         "completion_tokens": usage.completion_tokens,
                                         "total_tokens": usage.total_tokens}})))
        events.append(DONE)
        await self.write_events(events)
        await self.resp.write_eof()
        return self.resp


def _estimated_usage(exchange: Exchange) -> Usage | None:
    """The usage of a stream stopped before its upstream counted it (``exchange.usage`` set, tagged
    ``usage_estimated``): the prompt estimated as the rate limiter estimates it, one completion token per event
    sent. None when no upstream was asked (a plugin's reply costs nothing)."""
    if not exchange.attempts:
        return None
    from .tokens import estimate_prompt_tokens

    try:
        prompt = estimate_prompt_tokens(exchange.endpoint, exchange.json)
    except ValueError:  # (the body parsed before; a plugin may have replaced it)
        prompt = 0
    exchange.usage = Usage(prompt, exchange.chunks_sent, prompt + exchange.chunks_sent)
    exchange.tags.add("usage_estimated")
    return exchange.usage


def _usage_value_is_null(ev: bytes, at: int) -> bool:
    # The two spellings upstreams use, compared in place; the loop handles any other spacing.
    if ev.startswith(b':null', at + 7) or ev.startswith(b': null', at + 7):
        return True
    j = at + 7
    n = len(ev)
    while j < n and ev[j] in b" :\t":
        j += 1
    return ev[j:j + 4] == b"null"


_USAGE_NULL_END = b'"usage":null}'
_ERROR_WINDOW, _WHOLE_EVENT = 48, 1 << 62


def _event_json(ev: bytes) -> Any:
    data = ev[6:] if ev.startswith(b"data: ") and b"\n" not in ev else Chunk(ev).data.encode()
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


#: Delta members that carry an answer (anything else in a chunk before them is framing: role, refusal null, ...).
_CONTENT_MEMBERS = ("content", "tool_calls", "function_call", "refusal", "reasoning_content", "reasoning")


def _content_free(ev: bytes) -> bool:
    """Whether an event, seen before any content, carries nothing of the answer: a role-only opening chunk
    (OpenAI's, vLLM's, with or without ``"refusal": null``) or Azure's prompt-filter chunk (empty ``choices``).
    Such events are held back, and do not count as the first token, until real content follows."""
    obj = _event_json(ev)
    if not isinstance(obj, dict) or "error" in obj:
        return False
    choices = obj.get("choices")
    if not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, dict) or choice.get("finish_reason") or choice.get("text"):
            return False
        delta = choice.get("delta")
        if isinstance(delta, dict) and any(delta.get(key) for key in _CONTENT_MEMBERS):
            return False
    return True


def _finished(ev: bytes | None) -> bool:
    """Whether the last chunk relayed ended its choices (``finish_reason`` set): the answer was complete even if
    the upstream then closed without ``[DONE]``."""
    if ev is None or b'"finish_reason"' not in ev:
        return False
    obj = _event_json(ev)
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list) or not choices:
        return False
    return all(isinstance(c, dict) and c.get("finish_reason") for c in choices)


def _not_json(what: str) -> StreamBroken:
    return StreamBroken(UpstreamError(502, f"the upstream sent {what} in its event stream", kind="protocol",
                                      retryable=True, code="upstream_protocol_error"))


def _canonical(ev: bytes) -> bytes | None:
    """An event that is not a one-line ``data: {...}`` (rare, so looked at closely): ``[DONE]`` in any spelling
    (``data:[DONE]``) as :data:`DONE`, JSON data as one ``data: `` line (``data:{...}``, several ``data:`` lines,
    ``event:`` or ``id:`` fields), None for an event without data; raises :class:`StreamBroken` for data that
    is not JSON (an OpenAI client's parser would fail on it mid-stream)."""
    if ev == DONE:
        return ev
    data = Chunk(ev).data.strip()
    if data == "[DONE]":
        return DONE
    if not data:
        return None
    if data[0] not in "{[":
        raise _not_json("data that is not JSON")
    if "\n" in data:  # several data lines: one line, as every client's parser takes it
        try:
            return b"data: " + orjson.dumps(orjson.loads(data))
        except orjson.JSONDecodeError:
            raise _not_json("data that is not JSON") from None
    return b"data: " + data.encode()


def _stream_error(obj: Any) -> UpstreamError | None:
    """The error an event carries: OpenAI's ``{"error": {...}}`` (also inside a chunk, as OpenRouter sends it) or
    the ``{"object": "error", "message": ...}`` of vLLM and other OpenAI-compatible servers; None for a chunk."""
    if not isinstance(obj, dict):
        return None
    err = obj.get("error")
    if isinstance(err, dict):
        return UpstreamError(502, str(err.get("message") or "upstream error"), kind="stream_error", retryable=True,
                             body=obj, code=err.get("code"))
    if obj.get("object") == "error":
        code = obj.get("code")
        return UpstreamError(502, str(obj.get("message") or "upstream error"), kind="stream_error", retryable=True,
                             code=code if isinstance(code, str) else "upstream_error")
    return None


def _hooked(on_chunk: Callable[[Exchange, Chunk], list[Chunk]], exchange: Exchange, ev: bytes) -> list[bytes]:
    """The events the ``on_chunk`` chain makes of one event. ``[DONE]`` is the stream's end and the gateway's to
    write, once and last: a hook may drop it, hold chunks back until it or add chunks before it, but ``[DONE]``
    is still written after them, and a ``[DONE]`` a hook returns in place of another event is dropped (a hook
    ends a stream early by raising ``StopStream``)."""
    raws = [chunk.raw for chunk in on_chunk(exchange, Chunk(ev))]
    if DONE in raws:
        raws = [raw for raw in raws if raw != DONE]
    if ev == DONE:
        raws.append(DONE)
    return raws


async def _flush(out: ClientStream, exchange: Exchange, batch: list[bytes]) -> None:
    if not out.content_sent:
        out.content_sent = True
        exchange.first_byte_at = monotonic()
    exchange.chunks_sent += len(batch)
    await out.write_events(batch)


async def relay_stream(out: ClientStream, upstream: UpstreamResponse, exchange: Exchange,
                       pipeline: "Pipeline", rewrite: Callable[[bytes], bytes | None] | None = None) -> None:
    """Relay one upstream stream to the client until ``[DONE]``.

    ``rewrite``, when given, sees each upstream data event first and returns it (changed or not) or None to
    drop it: the mid-stream continuation uses it; a plain relay passes None and pays nothing for it.
    Raises :class:`StreamBroken` when the upstream ends without ``[DONE]`` or sends an error event,
    :class:`proxy.StopStream` when a plugin stops the stream, and lets connection errors of either side through.
    """
    on_chunk = pipeline.on_chunk
    strip_usage = not exchange.include_usage
    guard = out.guard
    time = out.loop.time
    saw_done = False
    held: list[bytes] | None = None
    # Writes of a stream we prepared go straight to the connection's writer: StreamResponse.write only checks
    # that the response is prepared and not ended, which fast_write (below) guarantees, and is a coroutine frame
    # more per upstream read.
    resp_write = out.request.writer.write
    fast_write = out.egress is None and out._prepare is True and out.resp.prepared
    read = upstream.raw_sse()  # a read of the upstream's bytes (b"" at the end), or None: batches of events
    parser = SSEParser() if read is not None else None
    feed = parser.feed if parser is not None else None
    next_item = read if read is not None else upstream.batches().__aiter__().__anext__
    ended = False
    #: The steady state: the stream is live, written by us in the OpenAI format, and no hook or rewrite sees
    #: its events. A read of one ordinary chunk then takes the short lane below.
    steady = False
    #: Whether this upstream sent some of the answer yet (role-only and filter chunks are not; a continuation's
    #: upstream starts afresh: its first token is due within the first-token timeout too).
    answering = False
    #: The upstream spells events otherwise than ``data: {...}`` (``data:{...}``): each goes through the loop.
    irregular = False
    last: bytes | None = None  # the last chunk relayed (did it end the answer?)
    #: How far into an event ``"error"`` is looked for: the whole event until the answer starts, then the first
    #: bytes, where an error event has it (a full scan of every chunk costs ~1k instructions); the whole event
    #: again for streams of aggregators whose chunks name a ``"provider"`` (OpenRouter), which put an ``"error"``
    #: member inside a chunk when their upstream fails mid-stream.
    error_window = _WHOLE_EVENT
    while True:
        try:
            item: Any = await next_item()
        except StopAsyncIteration:  # the end of the batches
            item = None
        if not item and (feed is not None or item is None):  # the end (b"" read, or no batch left)
            # A final event without its blank line: deliver it rather than lose it.
            tail = parser.pending.strip(b"\r\n") if parser is not None and not ended else b""
            ended = True
            if tail:
                events = [tail]
            elif not saw_done and _finished(last):
                # The answer ended (finish_reason), then the upstream closed without [DONE], as some servers
                # do: complete, not cut (and another route must not continue it).
                events, last = [DONE], None
            else:
                break
        else:
            if feed is None:
                events = item
            else:
                events = feed(item)
                if not events:
                    continue
                if steady and len(events) == 1:
                    ev = events[0]
                    if (ev.endswith(_USAGE_NULL_END) or b'"usage"' not in ev and ev[-1] == 125) \
                            and ev.find(b'"error"', 0, error_window) < 0:
                        # One ordinary chunk, the usual read of a token stream: what the loop below does with
                        # it, without its per-event bookkeeping (the upstream's first event, held role chunks,
                        # hooks and the final-chunk template only matter before or outside this state). The
                        # checks are the loop's own (an object's end: "usage":null} as upstreams asked for usage
                        # write every chunk, or "}" (125), so neither [DONE] nor other data); a read of several
                        # events, or of any other event, takes the loop.
                        now = time()
                        if guard is not None:
                            guard.last_event = guard.last_write = now
                        data = ev + b"\n\n"
                        exchange.chunks_sent += 1
                        exchange.bytes_sent += len(data)
                        last = ev
                        await resp_write(data)
                        continue
        now = time()
        if guard is not None:
            guard.last_event = now
        if exchange.upstream_first_at is None:
            exchange.upstream_first_at = monotonic()
        batch: list[bytes] = []
        try:
            for ev in events:
                if ev[:1] == b":":
                    if out.content_sent:
                        batch.append(ev)  # upstream comments pass once the stream is live
                    continue
                if ev[:7] != b"data: {":
                    canonical = _canonical(ev)
                    if canonical is None:
                        continue
                    if canonical != DONE:
                        irregular = True
                    ev = canonical
                if rewrite is not None and ev != DONE:
                    ev = rewrite(ev)  # type: ignore[assignment]
                    if ev is None:
                        continue
                if ev == DONE:
                    saw_done = True
                else:
                    # OpenAI ends every chunk with "usage":null once usage is asked for (the gateway always
                    # asks): recognise that ending without scanning the event.
                    at = -1 if ev.endswith(_USAGE_NULL_END) else ev.find(b'"usage"')
                    if at >= 0 and not _usage_value_is_null(ev, at):
                        obj = _event_json(ev)
                        if isinstance(obj, dict):
                            error = _stream_error(obj)
                            if error is not None:
                                raise StreamBroken(error)
                            exchange.usage = Usage.from_dict(obj.get("usage"))
                            if not obj.get("choices"):
                                if strip_usage:
                                    continue
                            else:
                                last = ev
                                if strip_usage:
                                    obj.pop("usage", None)
                                    ev = encode_event(orjson.dumps(obj))
                    else:
                        if ev.find(b'"error"', 0, error_window) >= 0:  # parsed only when the word is there
                            error = _stream_error(_event_json(ev))
                            if error is not None:
                                raise StreamBroken(error)
                        last = ev
                    if not answering and not _content_free(ev):
                        answering = True
                        if guard is not None:
                            guard.got_first = True  # the first token: the first-token timeout is met
                        if b'"provider"' not in ev:
                            error_window = _ERROR_WINDOW
                    out.last_template = ev
                if on_chunk is None:
                    batch.append(ev)
                else:
                    batch += _hooked(on_chunk, exchange, ev)
        except (StopStream, StreamBroken, GatewayError) as exc:
            if held:
                batch[:0] = held
            nothing_yet = not out.content_sent and not answering
            if batch and not (nothing_yet and isinstance(exc, StreamBroken)):
                await _flush(out, exchange, batch)  # what came before the failing event still reaches the client
            raise
        if batch:
            if held:
                batch[:0] = held
                held = None
            if out.content_sent and fast_write:
                # The common case, written here rather than through _flush/write_events (two coroutine
                # frames per upstream read): the stream is live, prepared by us, in the OpenAI format.
                data = batch[0] + b"\n\n" if len(batch) == 1 else b"\n\n".join(batch) + b"\n\n"
                exchange.chunks_sent += len(batch)
                exchange.bytes_sent += len(data)
                await resp_write(data)
                if guard is not None:
                    guard.last_write = now
            elif not out.content_sent and not answering and not saw_done:
                # Hold what comes before the answer (the opening role-only chunk, Azure's prompt-filter chunk)
                # until real content follows: if the upstream fails in between, nothing reached the client and
                # the next route can still answer.
                held = batch
            else:
                await _flush(out, exchange, batch)
                fast_write = out.egress is None and out._prepare is True
            steady = fast_write and out.content_sent and on_chunk is None and rewrite is None and not irregular
        if saw_done:
            return
    raise StreamBroken(UpstreamError(502, "the upstream closed the stream before it was complete",
                                     kind="truncated", retryable=True, code="upstream_stream_truncated"))


async def send_reply(request: web.Request, exchange: Exchange, reply: Reply, pipeline: "Pipeline") -> web.StreamResponse:
    """Send a plugin's complete answer (cache hit, refusal) as a stream or a body, through the output hooks."""
    if reply.status >= 400 or not exchange.stream:
        body = reply.body
        if body is None and reply.chunks is not None:
            body = merge_chunks([c if isinstance(c, dict) else Chunk(c).json for c in reply.chunks])
        if reply.status < 400 and pipeline.has_on_response:
            body = await pipeline.on_response(exchange, body)
        payload = orjson.dumps(body)
        if reply.status < 400:
            payload = answer_body(exchange, payload)
        resp = json_response(payload, reply.status, {**exchange.response_headers, **reply.headers})
        exchange.first_byte_at = monotonic()
        await resp.prepare(request)
        await resp.write_eof()
        return resp
    chunks = reply.chunks
    if chunks is None:
        chunks = body_to_chunks(reply.body, include_usage=exchange.include_usage)
    out = ClientStream(request, exchange)
    out.resp.headers.update(reply.headers)
    on_chunk = pipeline.on_chunk
    delays = reply.delays or ()
    raws = [c if isinstance(c, bytes) else encode_event(orjson.dumps(c)) for c in chunks]
    if not raws or raws[-1] != DONE:
        raws.append(DONE)
    try:
        for i, raw in enumerate(raws):
            if i < len(delays) and delays[i] > 0:
                await asyncio.sleep(delays[i])
            if raw != DONE:
                out.last_template = raw
            batch = _hooked(on_chunk, exchange, raw) if on_chunk is not None else [raw]
            if batch:
                if not out.content_sent:
                    out.content_sent = True
                    exchange.first_byte_at = monotonic()
                exchange.chunks_sent += len(batch)
                await out.write_events(batch)
    except StopStream as stop:
        exchange.outcome = Outcome.STOPPED
        return await out.stop(stop)
    return await out.finish()
