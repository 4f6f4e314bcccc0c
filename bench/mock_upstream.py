"""A fast OpenAI-compatible mock upstream for the benchmark (aiohttp + uvloop).

``POST /v1/chat/completions``:

* ``"stream": false`` (or absent): a small fixed ``chat.completion`` JSON body, after ``"bench_delay_ms"``
  when the request sets it (``bench.liveheap`` holds requests in flight with it).
* ``"stream": true``: a role chunk, exactly 64 content chunks, a finish chunk, a usage chunk when
  ``stream_options.include_usage`` is set (every chunk then also carries ``"usage": null``, as OpenAI does),
  then ``data: [DONE]``. Each event is written with its own ``await resp.write``. The request body field
  ``"bench_delay_ms"`` is the pause between two content chunks (63 pauses per stream); 0 writes every event
  back to back. All bytes are built once at start-up.

    python -m bench.mock_upstream --port 0      # prints "READY <port>" once listening
"""
from __future__ import annotations

import argparse
import asyncio
import signal

import orjson
from aiohttp import web

__all__ = ["CONTENT_CHUNKS", "build_stream", "build_body", "make_app"]

CONTENT_CHUNKS = 64
MODEL = "bench-model"
_BASE = {"id": "chatcmpl-bench0000000000000000000000", "object": "chat.completion.chunk", "created": 1700000000,
         "model": MODEL, "system_fingerprint": "fp_bench"}
_USAGE = {"prompt_tokens": 12, "completion_tokens": CONTENT_CHUNKS, "total_tokens": 12 + CONTENT_CHUNKS}


def _event(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _chunk(delta: dict, finish_reason: str | None, include_usage: bool) -> dict:
    obj = {**_BASE, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if include_usage:
        obj["usage"] = None
    return obj


def build_stream(include_usage: bool) -> tuple[bytes, list[bytes], list[bytes]]:
    """(role event, the 64 content events, the closing events), each a complete SSE event with terminator."""
    role = _event(_chunk({"role": "assistant", "content": ""}, None, include_usage))
    content = [_event(_chunk({"content": f" token{i:02d}"}, None, include_usage)) for i in range(CONTENT_CHUNKS)]
    tail = [_event(_chunk({}, "stop", include_usage))]
    if include_usage:
        tail.append(_event({**_BASE, "choices": [], "usage": _USAGE}))
    tail.append(b"data: [DONE]\n\n")
    return role, content, tail


def build_body() -> bytes:
    return orjson.dumps({
        "id": "chatcmpl-bench0000000000000000000000", "object": "chat.completion", "created": 1700000000,
        "model": MODEL, "system_fingerprint": "fp_bench",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the benchmark mock."},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
    })


_STREAMS = {True: build_stream(True), False: build_stream(False)}
_BODY = build_body()
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return web.Response(status=400, body=b'{"error":{"message":"bad json","type":"invalid_request_error"}}',
                            content_type="application/json")
    delay = float(body.get("bench_delay_ms") or 0) / 1000.0
    if not body.get("stream"):
        if delay > 0:
            await asyncio.sleep(delay)
        return web.Response(body=_BODY, content_type="application/json")
    opts = body.get("stream_options")
    include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
    role, content, tail = _STREAMS[include_usage]
    resp = web.StreamResponse(headers=_SSE_HEADERS)
    await resp.prepare(request)
    write = resp.write
    await write(role)
    if delay > 0:
        sleep = asyncio.sleep
        await write(content[0])
        for ev in content[1:]:
            await sleep(delay)
            await write(ev)
    else:
        for ev in content:
            await write(ev)
    for ev in tail:
        await write(ev)
    await resp.write_eof()
    return resp


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat_completions)
    return app


async def serve(host: str, port: int) -> None:
    runner = web.AppRunner(make_app(), access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {bound}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    import uvloop

    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
