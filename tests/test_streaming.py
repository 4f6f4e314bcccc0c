"""Streaming through the gateway against real upstream servers on 127.0.0.1."""
from __future__ import annotations

import asyncio

import aiohttp
import attrs
import orjson
import pytest

from proxy import hookimpl
from proxy.sse import SSEParser
from proxy.testing import Script, config_for
from tests.conftest import openai_client
from tests.helpers import CHAT, content_of, data_events, read_stream

STREAM = {**CHAT, "stream": True}


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64, None])
@pytest.mark.parametrize("crlf", [False, True])
async def test_events_pass_through_chunk_for_chunk(upstream, gateway_factory, chunk_size, crlf):
    upstream.script = Script(texts=["Hel", "lo", " wor", "ld", "\n", "é✓"], chunk_size=chunk_size, crlf=crlf)
    gw = await gateway_factory(config_for(upstream))
    status, headers, events = await read_stream(gw.base_url + "/chat/completions", STREAM)
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    assert headers["x-ssegate-provider"] == "up0"
    # Upstream was asked for usage; the client did not ask, so the usage chunk is stripped again.
    assert upstream.requests[-1]["stream_options"] == {"include_usage": True}
    # Chunk for chunk what the upstream sent, less its final usage chunk (chunks keep their "usage": null).
    sent = data_events(upstream.events(upstream.requests[-1]))
    assert sent[-2]["choices"] == [] and sent[-2]["usage"]
    assert data_events(events) == sent[:-2] + ["[DONE]"]
    assert content_of(events) == "Hello world\né✓"


async def test_usage_chunk_kept_when_the_client_asks(upstream, gateway_factory):
    gw = await gateway_factory(config_for(upstream))
    body = {**STREAM, "stream_options": {"include_usage": True}}
    _, _, events = await read_stream(gw.base_url + "/chat/completions", body)
    objs = data_events(events)
    assert objs[-1] == "[DONE]"
    assert objs[-2]["choices"] == [] and objs[-2]["usage"]["total_tokens"] == 11


async def test_openai_sdk_streams_and_non_streams(upstream, gateway_factory):
    upstream.script = Script(chunk_size=5)  # SSE split at odd byte boundaries
    gw = await gateway_factory(config_for(upstream))
    client = openai_client(gw.base_url)
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=CHAT["messages"], stream=True,
                                                  stream_options={"include_usage": True})
    parts, usage = [], None
    async for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == "Hello, world!"
    assert usage is not None and usage.completion_tokens == 4
    answer = await client.chat.completions.create(model="gpt-4o-mini", messages=CHAT["messages"])
    assert answer.choices[0].message.content == "Hello, world!"
    assert answer.usage.total_tokens == 11
    await client.close()


async def test_events_are_flushed_as_they_arrive(upstream, gateway_factory):
    """Each event reaches the client while the upstream is still waiting to send the next one."""
    upstream.script = Script(texts=["a", "b", "c"], delay=0.3)
    gw = await gateway_factory(config_for(upstream))
    arrivals = []
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.base_url + "/chat/completions", data=orjson.dumps(STREAM)) as resp:
            start = loop.time()
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    arrivals.append(loop.time() - start)
    # 5 data events spaced by the upstream's 0.3 s delay: were they buffered, they would arrive together.
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert len(arrivals) == 5
    assert sum(1 for g in gaps if g > 0.15) >= 3


@pytest.fixture
def first_writes(monkeypatch):
    """What the gateway's event-stream responses write first (the status line and headers, and what came with
    them in the same write), recorded in aiohttp's writer."""
    from aiohttp.http_writer import StreamWriter

    seen: list[bytes] = []
    write, writelines = StreamWriter._write, StreamWriter._writelines

    def record(data: bytes) -> None:
        if data.startswith(b"HTTP/1.1 200") and b"X-Request-ID" in data and b"text/event-stream" in data:
            seen.append(data)

    def _write(self, chunk):  # type: ignore[no-untyped-def]
        record(bytes(chunk))
        return write(self, chunk)

    def _writelines(self, chunks):  # type: ignore[no-untyped-def]
        record(b"".join(bytes(c) for c in chunks))
        return writelines(self, chunks)

    monkeypatch.setattr(StreamWriter, "_write", _write)
    monkeypatch.setattr(StreamWriter, "_writelines", _writelines)
    return seen


@pytest.mark.parametrize("first", ["content", "keepalive"])
async def test_the_headers_go_out_with_the_first_event_in_one_write(upstream, gateway_factory, first_writes, first):
    """One write, not two, for the 200 and the first token (or the first keepalive): the first token reaches the
    client a system call sooner."""
    upstream.script = Script(texts=["late"], first_delay=0.3 if first == "keepalive" else 0.05)
    gw = await gateway_factory(config_for(upstream, keepalive_interval=0.1))
    status, _, events = await read_stream(gw.base_url + "/chat/completions", STREAM)
    assert status == 200 and content_of(events) == "late"
    assert len(first_writes) == 1
    head, _, rest = first_writes[0].partition(b"\r\n\r\n")
    assert (b": keepalive" if first == "keepalive" else b"data: {") in rest


async def test_keepalive_comments_while_waiting_for_first_token(upstream, gateway_factory):
    upstream.script = Script(texts=["late"], first_delay=0.5)
    gw = await gateway_factory(config_for(upstream, keepalive_interval=0.1))
    status, _, events = await read_stream(gw.base_url + "/chat/completions", STREAM)
    assert status == 200
    first_data = next(i for i, e in enumerate(events) if e.startswith(b"data:"))
    assert first_data >= 2 and all(e == b": keepalive" for e in events[:first_data])
    assert content_of(events) == "late"


async def test_keepalive_comments_between_chunks(upstream, gateway_factory):
    upstream.script = Script(texts=["a", "b"], delay=0.45)
    gw = await gateway_factory(config_for(upstream, keepalive_interval=0.1))
    _, _, events = await read_stream(gw.base_url + "/chat/completions", STREAM)
    data_positions = [i for i, e in enumerate(events) if e.startswith(b"data:")]
    between = events[data_positions[1]:data_positions[2]]
    assert b": keepalive" in between
    assert content_of(events) == "ab"


async def test_keepalive_off(upstream, gateway_factory):
    import attrs

    upstream.script = Script(texts=["a"], first_delay=0.3)
    config = config_for(upstream, keepalive_interval=0.05)
    config = attrs.evolve(config, streaming=attrs.evolve(config.streaming, keepalive=False))
    gw = await gateway_factory(config)
    _, _, events = await read_stream(gw.base_url + "/chat/completions", STREAM)
    assert not any(e.startswith(b":") for e in events)


async def test_failure_before_first_byte_is_an_error_status(upstream, gateway_factory):
    upstream.script = Script(status=400, error="bad thing")
    gw = await gateway_factory(config_for(upstream))
    client = openai_client(gw.base_url)
    with pytest.raises(__import__("openai").BadRequestError) as info:
        await client.chat.completions.create(model="m", messages=CHAT["messages"], stream=True)
    assert info.value.status_code == 400
    assert info.value.body["message"] == "bad thing"
    await client.close()


async def test_cut_mid_stream_ends_with_error_event_and_done(upstream, gateway_factory):
    upstream.script = Script(texts=["a", "b", "c", "d"], cut_after=2)
    gw = await gateway_factory(config_for(upstream))
    status, _, events = await read_stream(gw.base_url + "/chat/completions", STREAM)
    objs = data_events(events)
    assert status == 200
    assert content_of(events) == "ab"
    assert objs[-1] == "[DONE]"
    assert set(objs[-2]) == {"error"} and set(objs[-2]["error"]) == {"message", "type", "param", "code"}


async def test_error_event_inside_a_200_stream_is_a_failure(upstream, gateway_factory):
    upstream.script = Script(texts=["a", "b"], error_event_after=1)
    gw = await gateway_factory(config_for(upstream))
    _, _, events = await read_stream(gw.base_url + "/chat/completions", STREAM)
    objs = data_events(events)
    assert objs[-1] == "[DONE]" and objs[-2]["error"]["message"] == "scripted failure"
    assert content_of(events) == "a"


async def test_error_event_before_content_falls_back(upstream, upstream2, gateway_factory):
    upstream.script = Script(texts=["a"], error_event_after=-1)  # the error is the very first event
    upstream2.script = Script(texts=["from", " two"])
    gw = await gateway_factory(config_for(upstream, upstream2))
    status, headers, events = await read_stream(gw.base_url + "/chat/completions", STREAM)
    assert status == 200 and content_of(events) == "from two"
    assert not any(b'"error"' in e for e in events)


async def test_fallback_to_the_next_provider_before_first_byte(upstream, gateway_factory):
    dead = "http://127.0.0.1:9/v1"  # nothing listens on the discard port
    gw = await gateway_factory(config_for(dead, upstream))
    status, headers, events = await read_stream(gw.base_url + "/chat/completions", STREAM)
    assert status == 200 and headers["x-ssegate-provider"] == "up1"
    assert content_of(events) == "Hello, world!"


async def test_all_providers_failing_gives_the_last_error(upstream, upstream2, gateway_factory):
    upstream.script = Script(status=503, error="one down")
    upstream2.script = Script(status=500, error="two down")
    gw = await gateway_factory(config_for(upstream, upstream2))
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.base_url + "/chat/completions", json=STREAM) as resp:
            assert resp.status == 500
            assert (await resp.json())["error"]["message"] == "two down"
    assert len(upstream.requests) == 1 and len(upstream2.requests) == 1


async def test_first_token_timeout_before_commit_is_504(upstream, gateway_factory):
    upstream.script = Script(first_delay=2.0)
    gw = await gateway_factory(config_for(upstream, first_token_timeout=0.2))
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.base_url + "/chat/completions", json=STREAM) as resp:
            assert resp.status == 504
            body = await resp.json()
    assert body["error"]["code"] == "first_token_timeout"
    await asyncio.wait_for(upstream.cancel_event.wait(), 2)


async def test_first_token_timeout_after_keepalive_is_an_sse_error(upstream, gateway_factory):
    upstream.script = Script(first_delay=2.0)
    gw = await gateway_factory(config_for(upstream, first_token_timeout=0.4, keepalive_interval=0.1))
    status, _, events = await read_stream(gw.base_url + "/chat/completions", STREAM)
    objs = data_events(events)
    assert status == 200 and events[0] == b": keepalive"
    assert objs[-1] == "[DONE]" and objs[-2]["error"]["code"] == "first_token_timeout"


class _Ending:
    """Records how each exchange ended (status and outcome, as exchange_done sees them)."""

    def __init__(self) -> None:
        self.ends: list[tuple[int, str | None]] = []

    @hookimpl
    def exchange_done(self, exchange):
        self.ends.append((exchange.status, exchange.outcome))


async def test_a_timeout_after_a_keepalive_records_the_200_the_client_got(upstream, gateway_factory):
    """The keepalive sent HTTP 200; the first-token timeout then ends the stream in-band. The exchange records the
    status the client got (200) and the timeout as its outcome, as a timeout mid-stream does."""
    upstream.script = Script(first_delay=2.0)
    ending = _Ending()
    gw = await gateway_factory(config_for(upstream, first_token_timeout=0.4, keepalive_interval=0.1,
                                          pipeline=["ending", "router"]), plugins={"ending": ending})
    status, headers, events = await read_stream(gw.base_url + "/chat/completions", STREAM)
    assert status == 200 and data_events(events)[-2]["error"]["code"] == "first_token_timeout"
    assert ending.ends == [(200, "timeout")]


async def test_a_stream_committed_by_a_keepalive_does_not_name_a_provider_that_then_fails(upstream, upstream2,
                                                                                        gateway_factory):
    """The keepalive commits the headers while the first provider is still tried; it times out and the second
    answers. The headers were sent too early to say who answers, so they do not name the first."""
    upstream.script = Script(first_delay=2.0)
    upstream2.script = Script(texts=["from", " the second"])
    gw = await gateway_factory(config_for(upstream, upstream2, first_token_timeout=0.4, keepalive_interval=0.1))
    status, headers, events = await read_stream(gw.base_url + "/chat/completions", STREAM)
    assert status == 200 and events[0] == b": keepalive"
    assert content_of(events) == "from the second"
    assert "x-ssegate-provider" not in {k.lower() for k in headers}
    # Without a keepalive first, the header names the provider that answered.
    upstream.script = Script(texts=["quick"])
    status, headers, events = await read_stream(gw.base_url + "/chat/completions", STREAM)
    assert content_of(events) == "quick" and headers["x-ssegate-provider"] == "up0"


async def test_idle_timeout_mid_stream(upstream, gateway_factory):
    upstream.script = Script(texts=["a", "b", "c"], hang_after=1)
    gw = await gateway_factory(config_for(upstream, idle_timeout=0.3))
    status, _, events = await read_stream(gw.base_url + "/chat/completions", STREAM)
    objs = data_events(events)
    assert content_of(events) == "a"
    assert objs[-1] == "[DONE]" and objs[-2]["error"]["code"] == "idle_timeout"
    await asyncio.wait_for(upstream.cancel_event.wait(), 2)


async def test_total_timeout_non_stream(upstream, gateway_factory):
    upstream.script = Script(first_delay=2.0)
    gw = await gateway_factory(config_for(upstream, timeout=0.3))
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.base_url + "/chat/completions", json=CHAT) as resp:
            assert resp.status == 504
            assert (await resp.json())["error"]["type"] == "timeout_error"


# -- the steady state: once content flows, reads of ordinary chunks take a short lane (proxy/relay.py) -------
# With a pause between events every upstream read carries one event, so each of these streams enters the
# steady state after its first content chunk and meets the usage chunk, error events, comments and [DONE] there.

async def test_steady_stream_relays_chunk_for_chunk_and_records_usage(upstream, gateway_factory):
    from structlog.testing import capture_logs

    upstream.script = Script(texts=["a", "b", "c", "d", "e"], delay=0.01)
    gw = await gateway_factory(config_for(upstream))
    with capture_logs() as logs:
        _, _, events = await read_stream(gw.base_url + "/chat/completions", STREAM)
    sent = data_events(upstream.events(upstream.requests[-1]))
    assert data_events(events) == sent[:-2] + ["[DONE]"]  # the usage chunk, alone in its read, is stripped
    (line,) = [e for e in logs if e["event"] == "access"]
    assert (line["prompt_tokens"], line["completion_tokens"], line["outcome"]) == (7, 4, "ok")


async def test_steady_stream_keeps_the_usage_chunk_the_client_asked_for(upstream, gateway_factory):
    upstream.script = Script(texts=["a", "b", "c"], delay=0.01)
    gw = await gateway_factory(config_for(upstream))
    body = {**STREAM, "stream_options": {"include_usage": True}}
    _, _, events = await read_stream(gw.base_url + "/chat/completions", body)
    assert data_events(events) == data_events(upstream.events(upstream.requests[-1]))


async def test_steady_stream_error_event_is_a_failure(upstream, gateway_factory):
    upstream.script = Script(texts=["a", "b", "c", "d"], delay=0.01, error_event_after=3)
    gw = await gateway_factory(config_for(upstream))
    _, _, events = await read_stream(gw.base_url + "/chat/completions", STREAM)
    objs = data_events(events)
    assert content_of(events) == "abc"
    assert objs[-1] == "[DONE]" and objs[-2]["error"]["message"] == "scripted failure"


async def test_steady_stream_cut_without_done_is_not_complete(upstream, gateway_factory):
    upstream.script = Script(texts=["a", "b", "c", "d"], delay=0.01, cut_after=3)
    gw = await gateway_factory(config_for(upstream))
    _, _, events = await read_stream(gw.base_url + "/chat/completions", STREAM)
    objs = data_events(events)
    assert content_of(events) == "abc"  # not complete, and not made to look it: an error event ends it
    assert objs[-1] == "[DONE]" and set(objs[-2]["error"]) == {"message", "type", "param", "code"}


async def test_steady_stream_usage_and_done_in_one_read(gateway_factory):
    """Content chunks one per read, then a comment, the usage chunk and [DONE] in a single read (as many servers
    end): that read leaves the short lane, the usage is recorded and stripped, the comment passes."""
    from aiohttp import web
    from structlog.testing import capture_logs

    from proxy.web_app import start_server

    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}], "usage": None}
    usage = {**chunk, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}

    async def chat(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(4):
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            await asyncio.sleep(0.01)
        await resp.write(b": a comment\n\ndata: " + orjson.dumps(usage) + b"\n\ndata: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner, port = await start_server(app, "127.0.0.1", 0)
    try:
        gw = await gateway_factory(config_for(f"http://127.0.0.1:{port}/v1"))
        with capture_logs() as logs:
            _, _, events = await read_stream(gw.base_url + "/chat/completions", STREAM)
    finally:
        await runner.cleanup()
    assert data_events(events) == [chunk] * 4 + ["[DONE]"]  # the usage chunk stripped, [DONE] seen
    assert b": a comment" in events  # upstream comments pass once the stream is live
    (line,) = [e for e in logs if e["event"] == "access"]
    assert (line["prompt_tokens"], line["completion_tokens"], line["outcome"]) == (3, 2, "ok")


# --- asking the upstream for usage ------------------------------------------------------------------------------
USAGE_MEMBER = b'"stream_options":{"include_usage":true},'


async def _post_raw(url: str, raw: bytes) -> list[object]:
    """POST ``raw`` as it is; the answer's data events."""
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=raw, headers={"Content-Type": "application/json"}) as r:
            assert r.status == 200
            parser, events = SSEParser(), []
            async for data in r.content.iter_any():
                events.extend(parser.feed(data))
    return data_events(events)


@pytest.mark.parametrize("lead", [b"", b" \n\t"])
async def test_usage_request_is_spliced_into_the_clients_bytes(upstream, gateway_factory, lead):
    """A long conversation is not serialized again to ask for usage: the member goes in after the brace, and every
    other byte of the client's body reaches the upstream as sent (spaces after colons included)."""
    gw = await gateway_factory(config_for(upstream))
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "lorem ipsum " * 40}
               for i in range(40)]
    raw = lead + b'{ "model": "gpt-4o-mini", "stream": true, "messages": ' + orjson.dumps(history) + b" }"
    events = await _post_raw(gw.base_url + "/chat/completions", raw)
    assert upstream.raw_requests[-1] == lead + b"{" + USAGE_MEMBER + raw[len(lead) + 1:]
    assert upstream.requests[-1] == {**orjson.loads(raw), "stream_options": {"include_usage": True}}
    sent = data_events(upstream.events(upstream.requests[-1]))
    assert events == sent[:-2] + ["[DONE]"]  # the usage chunk the client did not ask for is stripped


async def test_usage_request_when_the_client_set_stream_options_itself(upstream, gateway_factory):
    gw = await gateway_factory(config_for(upstream))
    events = await _post_raw(gw.base_url + "/chat/completions", orjson.dumps(
        {**STREAM, "stream_options": {"include_usage": False}}))
    assert upstream.requests[-1]["stream_options"] == {"include_usage": True}
    assert USAGE_MEMBER not in upstream.raw_requests[-1]
    assert all(not (isinstance(e, dict) and e.get("usage")) for e in events)


async def test_usage_request_survives_an_upstream_request_hook_editing_json(upstream, gateway_factory):

    class SetsTemperature:
        @hookimpl
        def upstream_request(self, exchange, request):
            request.json["temperature"] = 0.25

    gw = await gateway_factory(config_for(upstream, pipeline=["edit", "router"]), plugins={"edit": SetsTemperature()})
    await read_stream(gw.base_url + "/chat/completions", STREAM)
    sent = upstream.requests[-1]
    assert sent["temperature"] == 0.25 and sent["stream_options"] == {"include_usage": True}
    assert upstream.raw_requests[-1].count(b"stream_options") == 1


async def test_simulated_provider_reports_usage_the_client_did_not_ask_for(gateway_factory):
    """The in-process provider reads the request as a dict (``UpstreamRequest.payload``): it sees the spliced
    ``stream_options`` and streams the usage chunk, which the gateway records and strips."""
    from proxy.config.schema import (
        Config,
        PipelineEntry,
        ProviderConfig,
        SimulationConfig,
    )

    class Done:
        usage = None

        @hookimpl
        def exchange_done(self, exchange):
            Done.usage = exchange.usage

    config = Config(providers=(ProviderConfig(name="sim", type="simulated", simulation=SimulationConfig(
        ttft_ms=1, itl_ms=0)),), pipeline=(PipelineEntry("done"), PipelineEntry("router")))
    gw = await gateway_factory(config, plugins={"done": Done()})
    _, _, events = await read_stream(gw.base_url + "/chat/completions", {**STREAM, "max_tokens": 5})
    objs = data_events(events)
    assert objs[-1] == "[DONE]" and all(not o.get("usage") for o in objs[:-1])
    assert Done.usage is not None and Done.usage.completion_tokens > 0


# --- a long request's parsed body, let go once routed ------------------------------------------------------------
def _long_chat(model: str = "gpt-4o-mini", turns: int = 40, **extra: object) -> dict:
    """A chat request of about 20 kB (over the 8 KiB from which the parsed tree may be released)."""
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "lorem ipsum " * 40}
               for i in range(turns)]
    return {"model": model, "messages": history, **extra}


class _SeesTheRequest:
    """Reads ``exchange.json`` before routing (as cache, moderation and rate limits do) and again at the end."""

    def __init__(self) -> None:
        self.read_at_end: list[object] = []
        self.read_before: list[object] = []

    def parsed_once(self) -> bool:
        """Whether the end saw the very object the request was parsed into (not a parse made again)."""
        return self.read_at_end[-1] is self.read_before[-1]

    @hookimpl
    def check_request(self, exchange):
        self.read_before.append(exchange.json)

    @hookimpl
    def exchange_done(self, exchange):
        self.read_at_end.append(exchange.json)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_long_requests_parse_is_let_go_once_routed_and_parsed_again_when_read(upstream, gateway_factory,
                                                                                   stream):
    """Forwarding to an OpenAI-type provider needs only the client's bytes, so the parsed tree of a long request is
    not kept until the answer ends; a plugin reading ``exchange.json`` afterwards gets the same content."""
    seen = _SeesTheRequest()
    gw = await gateway_factory(config_for(upstream, pipeline=["seen", "router"]), plugins={"seen": seen})
    body = _long_chat(stream=stream)
    raw = orjson.dumps(body)
    if stream:
        events = await _post_raw(gw.base_url + "/chat/completions", raw)
        assert events[-1] == "[DONE]" and len(events) > 2
        assert upstream.raw_requests[-1] == b"{" + USAGE_MEMBER + raw[1:]  # still spliced, not re-serialized
    else:
        async with aiohttp.ClientSession() as s:
            async with s.post(gw.base_url + "/chat/completions", data=raw,
                              headers={"Content-Type": "application/json"}) as r:
                assert r.status == 200
                assert (await r.json())["object"] == "chat.completion"
        assert upstream.raw_requests[-1] == raw
    assert seen.read_before == [body] and seen.read_at_end == [body]
    assert not seen.parsed_once()


async def test_a_short_requests_parse_is_kept(upstream, gateway_factory):
    seen = _SeesTheRequest()
    gw = await gateway_factory(config_for(upstream, pipeline=["seen", "router"]), plugins={"seen": seen})
    await _post_raw(gw.base_url + "/chat/completions", orjson.dumps(_long_chat(turns=2, stream=True)))
    assert seen.parsed_once()


async def test_a_long_requests_parse_is_kept_when_a_route_renames_the_model(upstream, upstream2, gateway_factory):
    from proxy.config.schema import PipelineEntry

    seen = _SeesTheRequest()
    pipeline = [PipelineEntry("seen"), PipelineEntry("router", {"aliases": {"fast": ["up1/small-model"]}})]
    gw = await gateway_factory(config_for(upstream, upstream2, pipeline=pipeline), plugins={"seen": seen})
    await _post_raw(gw.base_url + "/chat/completions", orjson.dumps(_long_chat("fast", stream=True)))
    assert upstream2.requests[-1]["model"] == "small-model"
    assert upstream2.requests[-1]["messages"] == _long_chat()["messages"]
    assert seen.parsed_once()


async def test_a_long_requests_parse_is_kept_for_an_upstream_request_hook(upstream, gateway_factory):

    class SetsTemperature:
        @hookimpl
        def upstream_request(self, exchange, request):
            request.json["temperature"] = 0.5

    seen = _SeesTheRequest()
    gw = await gateway_factory(config_for(upstream, pipeline=["seen", "edit", "router"]),
                               plugins={"seen": seen, "edit": SetsTemperature()})
    await _post_raw(gw.base_url + "/chat/completions", orjson.dumps(_long_chat(stream=True)))
    assert upstream.requests[-1]["temperature"] == 0.5
    assert seen.parsed_once()


async def test_a_long_requests_parse_is_kept_for_an_adapter_that_reads_it(gateway_factory):
    """The simulated provider (like the Anthropic adapter) builds its answer from the parsed request."""
    from proxy.config.schema import (
        Config,
        PipelineEntry,
        ProviderConfig,
        SimulationConfig,
    )

    seen = _SeesTheRequest()
    config = Config(providers=(ProviderConfig(name="sim", type="simulated", simulation=SimulationConfig(
        ttft_ms=1, itl_ms=0)),), pipeline=(PipelineEntry("seen"), PipelineEntry("router")))
    gw = await gateway_factory(config, plugins={"seen": seen})
    events = await _post_raw(gw.base_url + "/chat/completions", orjson.dumps(_long_chat(stream=True, max_tokens=3)))
    assert events[-1] == "[DONE]"
    assert seen.parsed_once()


async def test_a_long_request_with_stream_options_in_its_text_still_asks_for_usage(upstream, gateway_factory):
    """The byte search for ``"stream_options"`` may find it inside a message; the parse then decides."""
    body = _long_chat(stream=True)
    body["messages"][0]["content"] = "stream_options"
    raw = orjson.dumps(body)
    gw = await gateway_factory(config_for(upstream))
    await _post_raw(gw.base_url + "/chat/completions", raw)
    assert upstream.raw_requests[-1] == b"{" + USAGE_MEMBER + raw[1:]


class _Weakly:
    """Keeps only weak references to the exchanges that end."""

    def __init__(self) -> None:
        self.refs: list = []

    @hookimpl
    def exchange_done(self, exchange):
        import weakref

        self.refs.append(weakref.ref(exchange))


@pytest.mark.parametrize("keepalive", [True, False])
async def test_a_finished_stream_is_freed_without_the_cycle_collector(upstream, gateway_factory, keepalive):
    """Reference counting alone frees a finished stream's exchange (no cycle through its guard and client
    stream): the gateway collects the oldest generation rarely, so garbage cycles of long streams piled up."""
    import gc

    weakly = _Weakly()
    config = config_for(upstream, pipeline=["weakly", "router"])
    if not keepalive:
        config = attrs.evolve(config, streaming=attrs.evolve(config.streaming, keepalive=False))
    gw = await gateway_factory(config, plugins={"weakly": weakly})
    await read_stream(gw.base_url + "/chat/completions", STREAM)  # a first one: lazily built state settles
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            status, _, events = await read_stream(gw.base_url + "/chat/completions", STREAM)
            assert status == 200 and data_events(events)[-1] == "[DONE]"
        for _ in range(50):  # the handlers' tasks end just after the last byte
            if all(ref() is None for ref in weakly.refs[1:]):
                break
            await asyncio.sleep(0.01)
        assert [ref() for ref in weakly.refs[1:]] == [None, None, None]
    finally:
        gc.enable()
