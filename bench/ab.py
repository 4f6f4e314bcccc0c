"""A/B a change to the gateway's hot path: interleaved short windows, medians, the passthrough as the yardstick.

    python -m bench.ab                          # the work tree's gateway vs the passthrough, non-stream c=64
    python -m bench.ab --ref HEAD~1             # ... and the gateway of HEAD~1 as a third contender
    python -m bench.ab --src /tmp/patched       # ... and the gateway whose proxy/ and plugins/ are there
    python -m bench.ab --load stream-c100 --rounds 5
    python -m bench.ab --lean-passthrough        # ... and the passthrough with the gateway's aiohttp shortcuts

Each round measures every contender once (the order rotates), so slow drift of the machine hits all of
them alike; the table gives the median CPU per request (or per stream) and its ratio to the passthrough.
Use it to decide whether an idea pays; record results with ``python -m bench`` (the full method).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.procstat import CpuWindow
from bench.run import (Proc, StreamScenario, conversation_body, export_ref, free_port, gateway_command,
                       gateway_config, raise_fd_limit, run_stream_client, run_wrk, write_wrk_script)

LOADS = {
    "nonstream-c1": ("wrk", 1), "nonstream-c16": ("wrk", 16), "nonstream-c64": ("wrk", 64),
    "stream-c1": ("stream", StreamScenario("c1", "stream C=1", 1, 200, 0.0, 20)),
    "stream-c100": ("stream", StreamScenario("c100", "stream C=100, 20 ms", 100, 200, 20.0, 100)),
    # The full run's TTFT cell: one stream at a time, a chunk every 20 ms, so each chunk wakes an idle proxy.
    "stream-c1-20ms": ("stream", StreamScenario("c1d20", "stream C=1, 20 ms", 1, 16, 20.0, 2)),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", action="append", default=[], help="also measure the gateway of this git ref")
    parser.add_argument("--src", action="append", default=[], type=Path, metavar="DIR",
                        help="also measure the gateway whose proxy/ and plugins/ are in DIR (e.g. a patched copy)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=VALUE[,NAME=VALUE]",
                        help="also measure the work tree's gateway with these environment variables set")
    parser.add_argument("--load", choices=sorted(LOADS), default="nonstream-c64")
    parser.add_argument("--lean-passthrough", action="store_true",
                        help="also measure the passthrough written with the gateway's shortcuts through aiohttp "
                             "(bench.passthrough --lean)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=3, help="wrk window per measurement")
    parser.add_argument("--body-bytes", type=int, default=0, metavar="N",
                        help="non-stream: send a chat request of at least N bytes (earlier turns of a conversation) "
                             "instead of the short one")
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 20 or not 1 <= args.seconds <= 30:
        parser.error("--rounds 1..20, --seconds 1..30")
    if not 0 <= args.body_bytes <= 1_000_000:
        parser.error("--body-bytes 0..1000000")
    raise_fd_limit()
    kind, load = LOADS[args.load]
    procs: dict[str, Proc] = {}
    with tempfile.TemporaryDirectory(prefix="ssegate-ab-") as tmp:
        tmpdir = Path(tmp)
        script = write_wrk_script(tmpdir, conversation_body(args.body_bytes))
        mock_port = free_port()
        mock = Proc("mock_upstream", [sys.executable, "-m", "bench.mock_upstream", "--port", str(mock_port)], 1,
                    mock_port, tmpdir)
        try:
            mock.start()
            contenders: list[tuple[str, Path | None, dict[str, str]]] = [("gateway", None, {})]
            for ref in args.ref:
                src = tmpdir / f"src-{len(contenders)}"
                export_ref(ref, src)
                contenders.append((f"gateway@{ref}", src, {}))
            for src in args.src:
                contenders.append((f"gateway@{src}", src.resolve(), {}))
            for variant in args.variant:
                pairs = dict(v.partition("=")[::2] for v in variant.split(","))
                contenders.append(("gateway+" + ",".join(f"{k}={v}" for k, v in pairs.items()), None, pairs))
            port = free_port()
            procs["passthrough"] = Proc("passthrough", [sys.executable, "-m", "bench.passthrough", "--port",
                                                        str(port), "--upstream", f"http://127.0.0.1:{mock_port}"],
                                        0, port, tmpdir).start()
            if args.lean_passthrough:
                port = free_port()
                procs["passthrough (lean)"] = Proc(
                    "passthrough-lean", [sys.executable, "-m", "bench.passthrough", "--lean", "--port", str(port),
                                         "--upstream", f"http://127.0.0.1:{mock_port}"], 0, port, tmpdir).start()
            for name, src, extra_env in contenders:
                port = free_port()
                config = tmpdir / f"{len(procs)}.yaml"
                gateway_config(config, port, mock_port)
                cmd, env, cwd = gateway_command(config, src)
                env.update(extra_env)
                safe = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name)
                procs[name] = Proc(safe, cmd, 0, port, tmpdir, env, cwd).start()
            samples: dict[str, list[float]] = {name: [] for name in procs}
            names = list(procs)
            for r in range(args.rounds):
                order = names[r % len(names):] + names[:r % len(names)]
                for name in order:
                    proc = procs[name]
                    url = f"http://127.0.0.1:{proc.port}/v1/chat/completions"
                    if kind == "wrk":
                        if r == 0:
                            run_wrk(url, load, 1, script, 1)  # warm-up
                        window = CpuWindow(proc.pid, ()).start()
                        w = run_wrk(url, load, args.seconds, script, 1)
                        cpu = window.stop()["proxy_cpu_s"]
                        samples[name].append(cpu / w["requests"] * 1e6)
                    else:
                        res: dict[str, Any] = run_stream_client(url, load, proc.pid, 1, tmpdir, True,
                                                                warmup=load.warmup if r == 0 else 0)
                        samples[name].append(res["proxy_cpu_s"] / res["completed"] * 1e3)
                    print(f"round {r + 1} {name:24s} {samples[name][-1]:9.1f}", file=sys.stderr, flush=True)
        finally:
            for proc in procs.values():
                proc.stop()
            mock.stop()
    unit = "us/request" if kind == "wrk" else "ms/stream"
    digits = 1 if kind == "wrk" else 3
    base = statistics.median(samples["passthrough"])
    print(f"| {args.load} ({args.rounds} rounds) | median {unit} | ratio | paired | spread |\n"
          "|---|---:|---:|---:|---:|")
    for name, values in samples.items():
        med = statistics.median(values)
        # paired: the median of the per-round ratios (a round's windows ran back to back, so a drift of the host
        # between rounds moves both alike)
        paired = statistics.median(v / p for v, p in zip(values, samples["passthrough"]))
        print(f"| {name} | {med:.{digits}f} | {med / base:.2f}x | {paired:.2f}x | "
              f"{min(values):.{digits}f}-{max(values):.{digits}f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
