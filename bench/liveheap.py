"""Live heap per in-flight request: what the gateway and the passthrough keep alive while a request waits for its
upstream, by allocation site (tracemalloc).

    python -m bench.liveheap                   # 64 non-stream requests held 2 s at the mock upstream
    python -m bench.liveheap --in-flight 200 --top 40

Under concurrency every in-flight request's objects compete for the CPU's caches. Each contender runs in a child
process; once warm, ``tracemalloc`` is started in it (SIGUSR1), ``--in-flight`` requests are sent at once to a mock
upstream that answers after ``--hold-ms``, and while they all wait a snapshot is taken (SIGUSR2). What the snapshot
holds was allocated after the start and is still alive: the requests' objects (plus the rare timer or pool entry),
divided here by the number of requests. Every request must answer 200.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import aiohttp
import orjson

from bench.run import NON_STREAM_BODY, ROOT, free_port, gateway_config, raise_fd_limit, start_mock_upstream

__all__ = ["main"]


def _child(argv: list[str]) -> None:
    """In the contender's process: run ``argv[0]`` as ``__main__`` with the two signal handlers installed."""
    out = os.environ["LIVEHEAP_OUT"]

    def start(*_: object) -> None:
        tracemalloc.start(1)

    def snapshot(*_: object) -> None:
        snap = tracemalloc.take_snapshot()
        tracemalloc.stop()
        snap.dump(out)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, snapshot)
    sys.argv = argv
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


async def _send(url: str, count: int, body: bytes) -> list[int]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        async def one() -> int:
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                await r.read()
                return r.status
        return list(await asyncio.gather(*(one() for _ in range(count))))


def _measure(name: str, module_argv: list[str], port: int, tmp: Path, count: int, hold_ms: int
             ) -> tracemalloc.Snapshot:
    out = tmp / f"{name}.snapshot"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSEGATE_")}
    env.update(LIVEHEAP_OUT=str(out), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "bench.liveheap", "--child", *module_argv], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    quick = NON_STREAM_BODY.encode()
    held = orjson.dumps({**orjson.loads(NON_STREAM_BODY), "bench_delay_ms": hold_ms})
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                asyncio.run(_send(url, 1, quick))
                break
            except aiohttp.ClientError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"{name} did not start")
                time.sleep(0.2)
        asyncio.run(_send(url, count, quick))  # warm: connection pools, caches, lazily built tables

        async def held_requests() -> list[int]:
            task = asyncio.ensure_future(_send(url, count, held))
            await asyncio.sleep(hold_ms / 2000)  # all sent, none answered
            proc.send_signal(signal.SIGUSR2)
            return await task

        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.3)
        statuses = asyncio.run(held_requests())
        if set(statuses) != {200}:
            raise SystemExit(f"{name}: statuses {sorted(set(statuses))}")
        for _ in range(100):
            if out.exists():
                break
            time.sleep(0.05)
        time.sleep(0.2)  # the dump is written by the child; let it finish
        return tracemalloc.Snapshot.load(str(out))
    finally:
        proc.terminate()
        proc.wait(10)


def _site(frame: tracemalloc.Frame) -> str:
    path = frame.filename
    for marker in ("site-packages/", str(ROOT) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{path}:{frame.lineno}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        _child(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-flight", type=int, default=64, help="requests held at the upstream at once")
    parser.add_argument("--hold-ms", type=int, default=2000, help="how long the upstream holds each request")
    parser.add_argument("--top", type=int, default=20, help="allocation sites listed per contender")
    args = parser.parse_args(argv)
    if not 1 <= args.in_flight <= 2000 or not 200 <= args.hold_ms <= 30000:
        parser.error("--in-flight 1..2000, --hold-ms 200..30000")
    raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="ssegate-liveheap-") as name:
        tmp = Path(name)
        mock = start_mock_upstream(tmp)
        mock_port = mock.port
        try:
            snaps = {}
            port = free_port()
            snaps["passthrough"] = _measure("passthrough", ["bench.passthrough", "--port", str(port), "--upstream",
                                                            f"http://127.0.0.1:{mock_port}"],
                                            port, tmp, args.in_flight, args.hold_ms)
            port = free_port()
            config = tmp / "gateway.yaml"
            gateway_config(config, port, mock_port)
            snaps["gateway"] = _measure("gateway", ["proxy", "serve", "--config", str(config)], port, tmp,
                                        args.in_flight, args.hold_ms)
        finally:
            mock.stop()
    n = args.in_flight
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, runpy.__file__)]
    print(f"| per in-flight request ({n} held {args.hold_ms} ms) | bytes | blocks |")
    print("|---|---:|---:|")
    tables = []
    for contender, snap in snaps.items():
        stats = snap.filter_traces(ignore).statistics("lineno")
        print(f"| {contender} | {sum(s.size for s in stats) / n:,.0f} | {sum(s.count for s in stats) / n:,.1f} |")
        tables.append((contender, stats))
    for contender, stats in tables:
        print(f"\n{contender}: the {args.top} largest allocation sites (bytes and blocks per request)")
        for s in stats[:args.top]:
            print(f"  {s.size / n:8,.0f} B {s.count / n:6.1f}  {_site(s.traceback[0])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
