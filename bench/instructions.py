"""Instructions per request: the gateway against the passthrough, counted by callgrind (deterministic).

    apt-get install valgrind
    python -m bench.instructions                          # non-stream, concurrency 16, 1000 requests
    python -m bench.instructions --load stream --requests 100
    python -m bench.instructions --load stream --requests 20 --concurrency 2 --delay-ms 50   # a chunk per read
    python -m bench.instructions --ref HEAD~1 --variant SSEGATE_OBSERVABILITY__ACCESS_LOG=false
    python -m bench.instructions --cache-sim                # also simulated cache misses per request

CPU time per request on a shared VM moves by ±10% between two identical processes (address layout, neighbours),
so a change worth 3% cannot be seen in ``bench.ab``'s CPU medians. Instructions executed by the proxy process
between two marks can: the same build counts the same number to within 0.1%. Each contender runs under
``valgrind --tool=callgrind`` (about 50x slower, so counts, not times, are what it is for); after a warm-up its
counters are zeroed, a fixed number of requests (or 64-chunk streams) run through it, and the counters are
dumped. The table gives instructions per request and the ratio to the passthrough. Instructions are not CPU
time (cache misses and system calls are not in them): record CPU ratios with ``python -m bench``.

``--cache-sim`` adds callgrind's cache simulation (about twice as slow again): first-level instruction and data
misses (I1, D1) and last-level misses (LL) per request. Where the CPU ratio of ``python -m bench`` is well above the
instruction ratio, these show whether the extra time is memory traffic.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import aiohttp

from bench.run import (NON_STREAM_BODY, ROOT, BenchError, Proc, StreamScenario, conversation_body, export_ref,
                       free_port, gateway_config, raise_fd_limit, run_stream_client, start_mock_upstream)

__all__ = ["main"]

_TOTALS = re.compile(rb"^(?:summary|totals):\s*([\d ]+)$", re.M)
_EVENTS = re.compile(rb"^events:\s*(.+)$", re.M)
#: Simulated cache events reported with --cache-sim: (column, callgrind events summed into it).
_CACHE_COLUMNS = (("I1 misses", ("I1mr",)), ("D1 misses", ("D1mr", "D1mw")), ("LL misses", ("ILmr", "DLmr", "DLmw")))
_BRANCH_COLUMNS = (("branches", ("Bc", "Bi")), ("mispredicted", ("Bcm", "Bim")))


async def _requests(url: str, count: int, concurrency: int, body: str = NON_STREAM_BODY) -> None:
    """Exactly ``count`` non-stream POSTs of ``body`` over ``concurrency`` keep-alive connections; any non-200
    fails."""
    left = count
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                async with session.post(url, data=body,
                                        headers={"Content-Type": "application/json"}) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise BenchError(f"{url} answered {resp.status}")

        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), 1800)


class Callgrind:
    """One proxy process under callgrind, with its counters zeroed and dumped around a load."""

    def __init__(self, name: str, argv: list[str], port: int, tmpdir: Path, env: dict[str, str] | None,
                 cwd: Path, cache_sim: bool = False, branch_sim: bool = False, extra: tuple[str, ...] = ()) -> None:
        self.out = tmpdir / f"callgrind.{name}"
        wrapped = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={self.out}", "--dump-instr=no",
                   *(["--cache-sim=yes"] if cache_sim else []),
                   *(["--branch-sim=yes"] if branch_sim else []), *extra, *argv]
        self.proc = Proc(name, wrapped, 0, port, tmpdir, env, cwd)
        #: The dump of the last count (kept with --keep).
        self.dump: Path | None = None

    def start(self) -> "Callgrind":
        self.proc.start(ready_timeout=180.0)
        return self

    def _control(self, flag: str) -> None:
        subprocess.run(["callgrind_control", flag, str(self.proc.pid)], check=True, capture_output=True,
                       timeout=120)

    def count(self, load: Callable[[], None]) -> dict[str, int]:
        """Events (``Ir``: instructions; with the cache simulation also ``I1mr``, ``D1mr``, ...) the process
        counted while ``load`` ran."""
        before = set(self.out.parent.glob(self.out.name + ".*"))
        self._control("-z")
        load()
        self._control("-d")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            dumps = set(self.out.parent.glob(self.out.name + ".*")) - before
            for path in dumps:
                text = path.read_bytes()
                m, names = _TOTALS.search(text), _EVENTS.search(text)
                if m and names:
                    self.dump = path
                    return dict(zip(names.group(1).decode().split(), map(int, m.group(1).split())))
            time.sleep(0.2)
        raise BenchError(f"no callgrind dump from {self.proc.name}")

    def stop(self) -> None:
        self.proc.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", action="append", default=[], help="also count the gateway of this git ref")
    parser.add_argument("--src", action="append", default=[], type=Path, metavar="DIR",
                        help="also count the gateway whose proxy/ and plugins/ are in DIR (e.g. a patched copy)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=VALUE[,NAME=VALUE]",
                        help="also count the work tree's gateway with these environment variables set")
    parser.add_argument("--load", choices=("nonstream", "stream"), default="nonstream")
    parser.add_argument("--requests", type=int, default=1000, help="requests (or streams) counted")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--delay-ms", type=float, default=0.0,
                        help="streams: upstream pause between content chunks (e.g. 50 at --concurrency 2: one chunk "
                             "per read even under callgrind)")
    parser.add_argument("--body-bytes", type=int, default=0, metavar="N",
                        help="non-stream: send a chat request of at least N bytes (earlier turns of a conversation) "
                             "instead of the short one")
    parser.add_argument("--no-passthrough", action="store_true", help="count gateways only")
    parser.add_argument("--lean-passthrough", action="store_true",
                        help="also count the passthrough written with the gateway's shortcuts through aiohttp "
                             "(bench.passthrough --lean)")
    parser.add_argument("--cache-sim", action="store_true", help="also count simulated cache misses")
    parser.add_argument("--valgrind-arg", action="append", default=[], metavar="ARG",
                        help="pass ARG to valgrind, e.g. --valgrind-arg=--LL=524288,8,64 (a smaller last-level "
                             "cache with --cache-sim)")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="copy each contender's callgrind dump into DIR (for callgrind_annotate)")
    parser.add_argument("--branch-sim", action="store_true",
                        help="also count simulated branch mispredictions (Bcm: conditional, Bim: indirect)")
    args = parser.parse_args(argv)
    if not 10 <= args.requests <= 20000 or not 1 <= args.concurrency <= 256:
        parser.error("--requests 10..20000, --concurrency 1..256")
    if not 0 <= args.delay_ms <= 1000:
        parser.error("--delay-ms 0..1000")
    if not 0 <= args.body_bytes <= 1_000_000:
        parser.error("--body-bytes 0..1000000")
    body = conversation_body(args.body_bytes)
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"error: `{tool}` is not installed. Install it with:  apt-get install valgrind", file=sys.stderr)
            return 2
    raise_fd_limit()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("SSEGATE_")}
    rows: list[tuple[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="ssegate-instr-") as tmp:
        tmpdir = Path(tmp)
        mock = start_mock_upstream(tmpdir)
        mock_port = mock.port
        contenders: list[tuple[str, list[str], dict[str, str], Path, int]] = []
        try:
            if not args.no_passthrough:
                port = free_port()
                contenders.append(("passthrough", [sys.executable, "-m", "bench.passthrough", "--port", str(port),
                                                   "--upstream", f"http://127.0.0.1:{mock_port}"],
                                   base_env, ROOT, port))
            if args.lean_passthrough:
                port = free_port()
                contenders.append(("passthrough (lean)", [sys.executable, "-m", "bench.passthrough", "--lean",
                                                          "--port", str(port), "--upstream",
                                                          f"http://127.0.0.1:{mock_port}"], base_env, ROOT, port))

            def gateway(name: str, src: Path | None, extra: dict[str, str]) -> None:
                port = free_port()
                config = tmpdir / f"{len(contenders)}.yaml"
                gateway_config(config, port, mock_port)
                env = {**base_env, **extra}
                if src is not None:
                    env["PYTHONPATH"] = str(src)
                cmd = [sys.executable, "-m", "proxy", "serve", "--config", str(config)]
                contenders.append((name, cmd, env, src or ROOT, port))

            gateway("gateway", None, {})
            for ref in args.ref:
                src = tmpdir / f"src-{len(contenders)}"
                export_ref(ref, src)
                gateway(f"gateway@{ref}", src, {})
            for src in args.src:
                gateway(f"gateway@{src}", src.resolve(), {})
            for variant in args.variant:
                pairs = dict(v.partition("=")[::2] for v in variant.split(","))
                gateway("gateway+" + ",".join(f"{k}={v}" for k, v in pairs.items()), None, pairs)

            for name, cmd, env, cwd, port in contenders:
                safe = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name)
                target = Callgrind(safe, cmd, port, tmpdir, env, cwd, args.cache_sim, args.branch_sim,
                                   tuple(args.valgrind_arg)).start()
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                try:
                    if args.load == "nonstream":
                        asyncio.run(_requests(url, 100, args.concurrency, body))  # warm-up
                        events = target.count(lambda: asyncio.run(_requests(url, args.requests,
                                                                            args.concurrency, body)))
                    else:
                        sc = StreamScenario("instr", "stream", args.concurrency, args.requests, args.delay_ms, 0)
                        run_stream_client(url, sc, None, 1, tmpdir, True, count=20, warmup=0)
                        events = target.count(lambda: _checked_streams(url, sc, tmpdir, args.requests))
                finally:
                    target.stop()
                if args.keep is not None and target.dump is not None:
                    args.keep.mkdir(parents=True, exist_ok=True)
                    shutil.copy(target.dump, args.keep / f"callgrind.{safe}")
                per = {"instructions": events["Ir"] / args.requests}
                if args.cache_sim:
                    for column, names in _CACHE_COLUMNS:
                        per[column] = sum(events.get(n, 0) for n in names) / args.requests
                if args.branch_sim:
                    for column, names in _BRANCH_COLUMNS:
                        per[column] = sum(events.get(n, 0) for n in names) / args.requests
                rows.append((name, per))
                print(f"{name:40s} " + "  ".join(f"{v:12,.0f} {k}" for k, v in per.items()), file=sys.stderr,
                      flush=True)
        finally:
            mock.stop()
    unit = "request" if args.load == "nonstream" else "64-chunk stream"
    base = rows[0][1] if not args.no_passthrough else None
    columns = list(rows[0][1])
    delay = f", {args.delay_ms:g} ms/chunk" if args.load == "stream" else f", {len(body):,}-byte body"
    print(f"| {args.load}, c={args.concurrency}{delay}, {args.requests} counted, per {unit} | "
          + " | ".join(f"{c} | ratio" for c in columns) + " |")
    print("|---|" + "---:|---:|" * len(columns))
    for name, per in rows:
        cells = []
        for column in columns:
            value = per[column]
            ratio = f"{value / base[column]:.3f}x" if base and base[column] else "-"
            cells.append(f"{value:,.0f} | {ratio}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


def _checked_streams(url: str, sc: StreamScenario, tmpdir: Path, count: int) -> None:
    res = run_stream_client(url, sc, None, 1, tmpdir, True, count=count, warmup=0)
    if res.get("completed") != count:
        raise BenchError(f"{count} streams asked, {res.get('completed')} completed: {res}")


if __name__ == "__main__":
    sys.exit(main())
