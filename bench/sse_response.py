"""Which response class should the relay write with? aiohttp-sse's EventSourceResponse vs a bare StreamResponse.

Serves 64-event streams from a server process pinned to core 0 (one endpoint per response class) and reads
them from this process on core 1; reports the server's CPU per stream for each. Run: python -m bench.sse_response
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

EVENTS = 64
STREAMS = 400
CONCURRENCY = 16
PAYLOAD = ('{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"m",'
           '"choices":[{"index":0,"delta":{"content":" token"},"finish_reason":null}]}')


def server(port: int) -> None:
    from aiohttp import web
    from aiohttp_sse import EventSourceResponse

    raw_event = b"data: " + PAYLOAD.encode() + b"\n\n"

    async def esr(request: web.Request) -> web.StreamResponse:
        resp = EventSourceResponse(allow_all_methods=True)
        await resp.prepare(request)
        for _ in range(EVENTS):
            await resp.send(PAYLOAD)
        await resp.send("[DONE]")
        return resp

    async def raw(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        for _ in range(EVENTS):
            await resp.write(raw_event)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def cpu(request: web.Request) -> web.Response:
        t = os.times()
        return web.json_response({"cpu": t.user + t.system})

    app = web.Application()
    app.router.add_post("/esr", esr)
    app.router.add_post("/raw", raw)
    app.router.add_get("/cpu", cpu)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=lambda *_: print("ready", flush=True))


async def measure(port: int, path: str) -> float:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async def cpu() -> float:
            async with session.get(f"http://127.0.0.1:{port}/cpu") as r:
                return float((await r.json())["cpu"])

        sem = asyncio.Semaphore(CONCURRENCY)

        async def one() -> None:
            async with sem:
                async with session.post(f"http://127.0.0.1:{port}{path}") as r:
                    async for _ in r.content.iter_any():
                        pass

        await asyncio.gather(*(one() for _ in range(50)))  # warm-up
        before = await cpu()
        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(STREAMS))), 120)
        return (await cpu() - before) / STREAMS * 1000


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--server":
        server(int(sys.argv[2]))
        return
    port = 18777
    proc = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-m", "bench.sse_response", "--server", str(port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        os.sched_setaffinity(0, {1})
        results = {}
        for _ in range(2):  # interleave to spread noise
            for name, path in (("StreamResponse.write", "/raw"), ("EventSourceResponse.send", "/esr")):
                results.setdefault(name, []).append(asyncio.run(measure(port, path)))
        base = min(results["StreamResponse.write"])
        print(f"server CPU per {EVENTS}-event stream (best of 2, C={CONCURRENCY}, {STREAMS} streams):")
        for name, values in results.items():
            print(f"  {name:26s} {min(values):7.3f} ms  ({min(values) / base:.2f}x)")
    finally:
        proc.terminate()
        proc.wait(10)
        time.sleep(0.1)


if __name__ == "__main__":
    main()
