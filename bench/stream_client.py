"""Streaming load client: C concurrent 64-chunk streams, repeated up to a bounded count.

Runs as its own process (the benchmark pins it to core 1) on uvloop. When given ``--pid`` (the proxy under
test), it reads that process's CPU time (utime+stime) right before and right after the measured phase, and
the machine's busy time to tell foreign load (``--other-pid``: benchmark processes that are not foreign), and
samples the proxy's RSS in a background thread; the warm-up phase before it is not measured.

Per stream it records:

* ``ttft``: seconds from just before the request is sent to the read that delivered the first content chunk
  (a ``data:`` event whose ``choices[0].delta.content`` is non-empty);
* ``incremental`` (only when ``--delay-ms`` > 0): the stream was delivered incrementally, meaning both
  (a) the reads that carried at least one content chunk number at least ceil(0.9 x 64) = 58, and
  (b) the time from the first to the last content chunk is at least 50% of the upstream's nominal
  duration, 63 x delay;
* ``ok``: HTTP 200, exactly 64 content chunks and ``data: [DONE]`` seen, within ``--timeout`` seconds.

Writes one JSON document (summary plus the TTFT list) to ``--out``.
"""
from __future__ import annotations

import argparse
import asyncio
import math
import os
import resource
import sys
import time
from collections import Counter
from typing import Any

import aiohttp
import orjson

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.procstat import CpuWindow, RssSampler  # noqa: E402

CONTENT_CHUNKS = 64
INCREMENTAL_READ_SHARE = 0.9
INCREMENTAL_SPAN_SHARE = 0.5
_HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream"}


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def request_body(delay_ms: float, include_usage: bool) -> bytes:
    body: dict[str, Any] = {
        "model": "bench-model",
        "messages": [{"role": "system", "content": "You are a benchmark."},
                     {"role": "user", "content": "Write 64 tokens, please."}],
        "stream": True,
        "bench_delay_ms": delay_ms,
    }
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


def _is_content(payload: bytes) -> bool:
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return False
    try:
        return bool(obj["choices"][0]["delta"].get("content"))
    except (KeyError, IndexError, TypeError, AttributeError):
        return False


async def one_stream(session: aiohttp.ClientSession, url: str, body: bytes, delay_ms: float,
                     timeout: float) -> dict[str, Any]:
    rec: dict[str, Any] = {"ok": False, "status": None, "error": None, "ttft": None, "chunks": 0,
                           "content_reads": 0, "span": None, "done": False, "incremental": None}
    first_t = last_t = None
    t_send = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            async with session.post(url, data=body, headers=_HEADERS) as resp:
                rec["status"] = resp.status
                if resp.status != 200:
                    await resp.read()
                    rec["error"] = f"HTTP {resp.status}"
                    return rec
                buf = b""
                async for data in resp.content.iter_any():
                    now = time.perf_counter()
                    buf = buf + data if buf else data
                    if b"\r" in buf:
                        buf = buf.replace(b"\r\n", b"\n")
                    events = buf.split(b"\n\n")
                    buf = events.pop()
                    n = 0
                    for ev in events:
                        if not ev.startswith(b"data:"):
                            continue  # comments (keepalives), empty events
                        payload = ev[5:].lstrip(b" ")
                        if payload == b"[DONE]":
                            rec["done"] = True
                        elif _is_content(payload):
                            n += 1
                    if n:
                        if first_t is None:
                            first_t = now
                        last_t = now
                        rec["content_reads"] += 1
                        rec["chunks"] += n
    except TimeoutError:
        rec["error"] = "timeout"
    except (aiohttp.ClientError, OSError) as exc:
        rec["error"] = f"{type(exc).__name__}: {exc}"[:200]
    if first_t is not None:
        rec["ttft"] = first_t - t_send
        rec["span"] = last_t - first_t  # type: ignore[operator]
    if rec["error"] is None:
        if not rec["done"]:
            rec["error"] = "no [DONE]"
        elif rec["chunks"] != CONTENT_CHUNKS:
            rec["error"] = f"{rec['chunks']} content chunks"
        else:
            rec["ok"] = True
    if delay_ms > 0 and rec["ok"]:
        need_reads = math.ceil(INCREMENTAL_READ_SHARE * CONTENT_CHUNKS)
        nominal = (CONTENT_CHUNKS - 1) * delay_ms / 1000.0
        rec["incremental"] = rec["content_reads"] >= need_reads and rec["span"] >= INCREMENTAL_SPAN_SHARE * nominal
    return rec


async def run_phase(session: aiohttp.ClientSession, url: str, concurrency: int, count: int, delay_ms: float,
                    include_usage: bool, timeout: float, deadline: float) -> tuple[list[dict[str, Any]], int]:
    """``count`` streams, ``concurrency`` at a time; stops starting new ones at ``deadline`` (monotonic)."""
    body = request_body(delay_ms, include_usage)
    records: list[dict[str, Any]] = []
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while issued < count and time.monotonic() < deadline:
            issued += 1
            records.append(await one_stream(session, url, body, delay_ms, timeout))

    workers = [asyncio.ensure_future(worker()) for _ in range(min(concurrency, count))]
    try:
        async with asyncio.timeout(max(1.0, deadline - time.monotonic() + timeout)):
            await asyncio.gather(*workers)
    except TimeoutError:
        pass
    for w in workers:
        w.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    return records, count - len(records)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100) of a non-empty list, else None."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(records: list[dict[str, Any]], not_run: int, delay_ms: float) -> dict[str, Any]:
    errors = Counter(r["error"] for r in records if not r["ok"])
    if not_run:
        errors["not started/finished before the phase deadline"] += not_run
    ttfts = [r["ttft"] for r in records if r["ok"] and r["ttft"] is not None]
    scored = [r for r in records if r["incremental"] is not None]
    return {
        "completed": sum(1 for r in records if r["ok"]),
        "failed": sum(1 for r in records if not r["ok"] and r["error"] != "timeout"),
        "timeouts": sum(1 for r in records if r["error"] == "timeout"),
        "not_run": not_run,
        "errors": dict(errors),
        "ttft_s": ttfts,
        "ttft_p50_ms": None if not ttfts else percentile(ttfts, 50) * 1000,  # type: ignore[operator]
        "ttft_p99_ms": None if not ttfts else percentile(ttfts, 99) * 1000,  # type: ignore[operator]
        "incremental_scored": len(scored) if delay_ms > 0 else 0,
        "incremental_ok": sum(1 for r in scored if r["incremental"]),
        "span_p50_s": percentile([r["span"] for r in records if r["ok"] and r["span"] is not None], 50),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60)
    result: dict[str, Any] = {"url": args.url, "concurrency": args.concurrency, "count": args.count,
                              "delay_ms": args.delay_ms, "include_usage": args.include_usage}
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None),
                                     auto_decompress=False) as session:
        if args.warmup > 0:
            # Warm-up, not measured: opens the keep-alive connections (client->proxy and proxy->upstream)
            # that the measured phase then reuses, and runs every code path once.
            t0 = time.monotonic()
            recs, not_run = await run_phase(session, args.url, args.warmup_concurrency or args.concurrency,
                                            args.warmup, 0, args.include_usage, args.timeout,
                                            time.monotonic() + args.max_seconds)
            warm = summarize(recs, not_run, 0)
            result["warmup"] = {"streams": args.warmup, "completed": warm["completed"], "errors": warm["errors"],
                                "seconds": time.monotonic() - t0}
            await asyncio.sleep(0.3)
        sampler = RssSampler(args.pid) if args.pid else None
        window = CpuWindow(args.pid, tuple(args.other_pid)).start() if args.pid else None
        t0 = time.monotonic()
        if sampler is not None:
            sampler.__enter__()
        try:
            records, not_run = await run_phase(session, args.url, args.concurrency, args.count, args.delay_ms,
                                               args.include_usage, args.timeout, t0 + args.max_seconds)
        finally:
            wall = time.monotonic() - t0
            cpu = window.stop() if window is not None else None
            if sampler is not None:
                sampler.__exit__(None, None, None)
    result["wall_s"] = wall
    result.update(summarize(records, not_run, args.delay_ms))
    if cpu is not None:
        result.update(cpu)  # proxy_cpu_s, foreign_cores, ... over the measured window
        result["proxy_rss_start"] = sampler.start_rss  # type: ignore[union-attr]
        result["proxy_rss_peak"] = sampler.peak  # type: ignore[union-attr]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="streaming load client for the ssegate benchmark")
    parser.add_argument("--url", required=True, help="full URL of /v1/chat/completions")
    parser.add_argument("--concurrency", "-c", type=int, default=1)
    parser.add_argument("--count", "-n", type=int, default=100, help="streams in the measured phase")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="upstream pause between content chunks")
    parser.add_argument("--warmup", type=int, default=0, help="unmeasured streams (delay 0) before the phase")
    parser.add_argument("--warmup-concurrency", type=int, default=0, help="default: --concurrency")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds allowed per stream")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="no new stream starts after this")
    parser.add_argument("--no-include-usage", dest="include_usage", action="store_false")
    parser.add_argument("--pid", type=int, default=0, help="proxy process to measure (CPU, RSS)")
    parser.add_argument("--other-pid", type=int, action="append", default=[],
                        help="benchmark processes whose CPU is not foreign load (mock, idle proxy); repeatable")
    parser.add_argument("--out", required=True, help="where to write the JSON result")
    args = parser.parse_args()
    raise_fd_limit()
    import uvloop

    result = uvloop.run(main_async(args))
    with open(args.out, "wb") as f:
        f.write(orjson.dumps(result))


if __name__ == "__main__":
    main()
