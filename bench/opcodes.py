"""Bytecodes the interpreter executes per request, by function: the gateway against the passthrough.

    python -m bench.opcodes                      # non-stream, concurrency 16, 500 requests
    python -m bench.opcodes --load stream --requests 50 --top 40
    python -m bench.opcodes --load stream --delay-ms 20 --concurrency 10   # one chunk per read, as from a model
    python -m bench.opcodes --target gateway --lines 60   # also the busiest lines of proxy/ and plugins/

Most of what the gateway adds to the passthrough's cost is Python work, and the interpreter's bytecode dispatch
runs at a lower rate per instruction than C code (llhttp, the kernel, orjson), so callgrind's instruction ratio
(``bench.instructions``) understates the CPU ratio. This counts what the interpreter does instead, exactly and
in seconds: each proxy is served in this process under an opcode tracer (``sys.settrace`` with
``f_trace_opcodes``) while a client in another process sends a fixed number of requests (or 64-chunk streams)
through it to the mock upstream; the counts are per request, per source file and per function. Tracing makes
the proxy ~30x slower, so time nothing with it; the counts of the same build repeat to within a few opcodes.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import linecache
import os
import sys
import tempfile
from pathlib import Path
from types import FrameType
from typing import Any, Callable

from aiohttp import web

from bench.run import ROOT, BenchError, gateway_config, start_mock_upstream

__all__ = ["main"]

Key = tuple[str, int, str]


class OpcodeCounter:
    """Counts the opcodes executed by every Python frame started while it is installed, per code object."""

    def __init__(self, lines: bool = False) -> None:
        self.counts: collections.Counter[Key] = collections.Counter()
        #: With ``lines``: opcodes per (file, line) of the project's own code (proxy/, plugins/).
        self.lines: collections.Counter[tuple[str, int]] | None = collections.Counter() if lines else None

    def _call(self, frame: FrameType, event: str, arg: Any) -> Callable[..., Any] | None:
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        code = frame.f_code
        key = (code.co_filename, code.co_firstlineno, code.co_qualname)
        counts = self.counts
        lines = self.lines
        if lines is not None and code.co_filename.startswith(_OWN):
            path = code.co_filename

            def by_line(frame: FrameType, event: str, arg: Any) -> Callable[..., Any]:
                if event == "opcode":
                    counts[key] += 1
                    lines[(path, frame.f_lineno)] += 1  # type: ignore[index]
                return by_line

            return by_line

        def local(frame: FrameType, event: str, arg: Any) -> Callable[..., Any]:
            if event == "opcode":
                counts[key] += 1
            return local

        return local

    def __enter__(self) -> "OpcodeCounter":
        sys.settrace(self._call)
        return self

    def __exit__(self, *exc: Any) -> None:
        sys.settrace(None)


_OWN = (str(ROOT / "proxy") + "/", str(ROOT / "plugins") + "/")


def _short(path: str) -> str:
    root = str(ROOT) + "/"
    if path.startswith(root):
        return path[len(root):]
    for marker in ("site-packages/", f"python{sys.version_info[0]}.{sys.version_info[1]}/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


async def _serve(target: str, upstream: str, tmpdir: Path) -> tuple[web.AppRunner, int]:
    if target == "passthrough":
        from bench.passthrough import make_app

        runner = web.AppRunner(make_app(upstream), access_log=None, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    from proxy.config import load_config
    from proxy.gateway import Gateway
    from proxy.log import configure_logging
    from proxy.web_app import create_app, start_server

    config_path = tmpdir / "gateway.yaml"
    gateway_config(config_path, 0, int(upstream.rsplit(":", 1)[1]))
    config = load_config(str(config_path))
    configure_logging(config.logging, open(os.devnull, "w"))  # JSON logs, as the benchmark's gateway writes them
    return await start_server(create_app(Gateway(config)), "127.0.0.1", 0)


def _client_argv(url: str, load: str, count: int, concurrency: int, tmpdir: Path, delay_ms: float = 0.0
                 ) -> list[str]:
    if load == "nonstream":
        return [sys.executable, "-m", "bench.opcodes", "--client", url, str(count), str(concurrency)]
    return [sys.executable, "-m", "bench.stream_client", "--url", url, "-c", str(concurrency), "-n", str(count),
            "--delay-ms", str(delay_ms), "--out", str(tmpdir / "streams.json")]


async def _count(target: str, upstream: str, load: str, count: int, concurrency: int,
                 tmpdir: Path, delay_ms: float = 0.0, lines: bool = False) -> OpcodeCounter:
    runner, port = await _serve(target, upstream, tmpdir)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        warm = await asyncio.create_subprocess_exec(*_client_argv(url, load, 20, concurrency, tmpdir), cwd=ROOT)
        if await warm.wait() != 0:
            raise BenchError(f"warm-up against the {target} failed")
        with OpcodeCounter(lines) as counter:
            client = await asyncio.create_subprocess_exec(
                *_client_argv(url, load, count, concurrency, tmpdir, delay_ms), cwd=ROOT)
            code = await asyncio.wait_for(client.wait(), 1800)
        if code != 0:
            raise BenchError(f"the client against the {target} exited {code}")
        return counter
    finally:
        await runner.cleanup()


def _report(name: str, counter: OpcodeCounter, per: int, top: int, top_lines: int = 0) -> float:
    counts = counter.counts
    total = sum(counts.values()) / per
    by_file: collections.Counter[str] = collections.Counter()
    for (path, _, _), n in counts.items():
        by_file[_short(path)] += n
    print(f"\n## {name}: {total:,.0f} opcodes per unit\n\n| opcodes | file |\n|---:|---|")
    for path, n in by_file.most_common(top):
        print(f"| {n / per:,.0f} | {path} |")
    print("\n| opcodes | function |\n|---:|---|")
    for (path, line, qualname), n in counts.most_common(top):
        print(f"| {n / per:,.0f} | {_short(path)}:{line} {qualname} |")
    if counter.lines:
        print("\n| opcodes | line of the project's code |\n|---:|---|")
        for (path, line), n in counter.lines.most_common(top_lines):
            text = linecache.getline(path, line).strip()
            print(f"| {n / per:,.1f} | {_short(path)}:{line} `{text[:90]}` |")
    return total


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--client"]:
        from bench.instructions import _requests  # the same fixed-count client

        asyncio.run(_requests(argv[1], int(argv[2]), int(argv[3])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", choices=("nonstream", "stream"), default="nonstream")
    parser.add_argument("--requests", type=int, default=500, help="requests (or streams) counted")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--target", choices=("both", "passthrough", "gateway"), default="both")
    parser.add_argument("--top", type=int, default=25, help="rows per table")
    parser.add_argument("--lines", type=int, default=0, metavar="N",
                        help="also list the N source lines of proxy/ and plugins/ that run the most opcodes")
    parser.add_argument("--delay-ms", type=float, default=0.0,
                        help="streams: upstream pause between content chunks (e.g. 20 at --concurrency 10: one "
                             "chunk per read, as from a model; 0: back to back, several per read)")
    args = parser.parse_args(argv)
    if not 10 <= args.requests <= 5000 or not 1 <= args.concurrency <= 256:
        parser.error("--requests 10..5000, --concurrency 1..256")
    if not 0 <= args.delay_ms <= 1000:
        parser.error("--delay-ms 0..1000")
    targets = ["passthrough", "gateway"] if args.target == "both" else [args.target]
    totals: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="ssegate-opcodes-") as tmp:
        tmpdir = Path(tmp)
        mock = start_mock_upstream(tmpdir)
        mock_port = mock.port
        try:
            import uvloop  # as the proxies run: asyncio's own loop would be counted too

            for target in targets:
                counter = uvloop.run(_count(target, f"http://127.0.0.1:{mock_port}", args.load, args.requests,
                                            args.concurrency, tmpdir, args.delay_ms, args.lines > 0))
                totals[target] = _report(target, counter, args.requests, args.top, args.lines)
        finally:
            mock.stop()
    unit = "request" if args.load == "nonstream" else "64-chunk stream"
    delay = f", {args.delay_ms:g} ms/chunk" if args.load == "stream" else ""
    print(f"\n| {args.load}, c={args.concurrency}{delay}, {args.requests} counted | opcodes per {unit} | ratio |")
    print("|---|---:|---:|")
    base = totals.get("passthrough")
    for target, total in totals.items():
        print(f"| {target} | {total:,.0f} | {f'{total / base:.3f}x' if base else '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
