"""Profile the gateway (or the passthrough) under one benchmark load with py-spy.

    pip install py-spy
    python -m bench.profile --target gateway --load nonstream-c64 --seconds 20
    python -m bench.profile --target gateway --load stream-c200 --seconds 20 --native

Starts the mock upstream and the target pinned as in ``python -m bench``, drives the load (wrk, or the stream
client) for about ``--seconds``, records the target with ``py-spy record`` meanwhile, writes the collapsed stacks (``--out``.txt, for
speedscope or flamegraph.pl), and prints the functions with the most samples, by
self time (the leaf frame) and by total time (anywhere on the stack).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.run import (Proc, StreamScenario, _child_setup, export_ref, free_port, gateway_command, gateway_config,
                       raise_fd_limit, run_stream_client, run_wrk, write_wrk_script)

LOADS = {
    "nonstream-c1": ("wrk", 1),
    "nonstream-c16": ("wrk", 16),
    "nonstream-c64": ("wrk", 64),
    "stream-c1": ("stream", StreamScenario("p", "stream C=1", 1, 100000, 0, 20)),
    "stream-c200": ("stream", StreamScenario("p", "stream C=200", 200, 100000, 20, 200)),
    "stream-c1000": ("stream", StreamScenario("p", "stream C=1000", 1000, 1000, 100, 1000)),
}

_ENTRY_FILES = ("proxy/cli.py", "proxy/__main__.py", "proxy/web_app.py")  # entry points, not request code
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<where>.*)\)$")


def top_functions(collapsed: Path, limit: int, own: tuple[str, ...] = ("proxy/", "plugins/")) -> str:
    """Summaries of py-spy's raw (collapsed) output.

    * self time per function (leaf frame, lines merged) and per line;
    * inclusive time per function;
    * "responsible line": each sample is charged to the deepest frame that lies in the project's own code
      (``own`` path prefixes), i.e. the gateway line whose call (into aiohttp, orjson, structlog...) is running;
      samples with no such frame are the server/event-loop machinery outside the project's code.
    """
    root = str(Path(__file__).resolve().parent.parent) + "/"
    stdlib = sys.prefix + "/lib/python" + f"{sys.version_info[0]}.{sys.version_info[1]}" + "/"

    def short(where: str) -> str:
        return where.replace(root, "").replace(stdlib + "site-packages/", "").replace(stdlib, "")

    self_line: collections.Counter[str] = collections.Counter()
    self_func: collections.Counter[str] = collections.Counter()
    total_func: collections.Counter[str] = collections.Counter()
    responsible: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = []
        for f in stack.split(";"):
            m = _FRAME.match(f)
            if m:
                where = short(m["where"])
                file, _, lineno = where.rpartition(":")
                frames.append((m["func"], file or where, lineno))
        if not frames:
            continue
        samples += n
        func, file, lineno = frames[-1]
        self_line[f"{func} ({file}:{lineno})"] += n
        self_func[f"{func} ({file})"] += n
        for key in {f"{fn} ({fl})" for fn, fl, _ in frames}:
            total_func[key] += n
        mine = [fr for fr in frames if fr[1].startswith(own) and fr[1] not in _ENTRY_FILES]
        if mine:
            fn, fl, ln = mine[-1]
            responsible[f"{fl}:{ln} in {fn}"] += n
        else:
            responsible["(no project frame: aiohttp server / event loop)"] += n
    if not samples:
        return "no samples"

    def block(title: str, counter: collections.Counter[str]) -> list[str]:
        return ["", title] + [f"  {100 * n / samples:5.1f}%  {k}" for k, n in counter.most_common(limit)]

    out = [f"{samples} samples (non-idle)"]
    out += block("self time by function:", self_func)
    out += block("self time by line:", self_line)
    out += block("inclusive time by function:", total_func)
    out += block("responsible project line (deepest frame in " + ", ".join(own) + "):", responsible)
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=("gateway", "passthrough"), default="gateway")
    parser.add_argument("--load", choices=sorted(LOADS), default="nonstream-c64")
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--native", action="store_true", help="include C frames (py-spy --native)")
    parser.add_argument("--blocking", action="store_true", help=(
        "pause the target for each sample (exact stacks, but the pauses make the target batch its work and "
        "distort per-request costs); default: py-spy --nonblocking"))
    parser.add_argument("--out", default=None, help="output path prefix (default: a temp dir)")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--ref", default=None, help="profile the gateway of this git ref instead of the work tree")
    parser.add_argument("--proxy-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    args = parser.parse_args()
    if not shutil.which("py-spy"):
        print("error: py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 2
    if not shutil.which("wrk"):
        print("error: `wrk` is not installed. Install it with:  apt-get install wrk", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {args.load_cpu})
    raise_fd_limit()
    tmp = Path(tempfile.mkdtemp(prefix="ssegate-profile-"))
    prefix = Path(args.out) if args.out else tmp / f"{args.target}-{args.load}"
    procs: list[Proc] = []
    spy: subprocess.Popen[bytes] | None = None
    try:
        mock_port = free_port()
        procs.append(Proc("mock_upstream", [sys.executable, "-m", "bench.mock_upstream", "--port", str(mock_port)],
                          args.load_cpu, mock_port, tmp).start())
        port = free_port()
        if args.target == "gateway":
            cfg = tmp / "gateway.yaml"
            gateway_config(cfg, port, mock_port)
            src = None
            if args.ref:
                src = tmp / "src"
                print(f"gateway: {args.ref} = {export_ref(args.ref, src)[:12]}", file=sys.stderr)
            argv, env, cwd = gateway_command(cfg, src)
            target = Proc("gateway", argv, args.proxy_cpu, port, tmp, env, cwd)
        else:
            target = Proc("passthrough", [sys.executable, "-m", "bench.passthrough", "--port", str(port),
                                          "--upstream", f"http://127.0.0.1:{mock_port}"], args.proxy_cpu, port, tmp)
        procs.append(target.start())
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        kind, spec = LOADS[args.load]
        wrk_script = write_wrk_script(tmp)
        if kind == "wrk":
            run_wrk(url, spec, 2, wrk_script, args.load_cpu)  # warm-up
        spy_cmd = ["py-spy", "record", "--pid", str(target.pid), "--rate", str(args.rate),
                   "--duration", str(args.seconds + 1), "--format", "raw", "-o", str(prefix) + ".txt"]
        if args.native:
            spy_cmd.append("--native")
        if not args.blocking:
            spy_cmd.append("--nonblocking")
        spy = subprocess.Popen(spy_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_child_setup)
        time.sleep(0.5)
        if kind == "wrk":
            w = run_wrk(url, spec, args.seconds, wrk_script, args.load_cpu)
            print(f"wrk: {w['requests']} requests, {w['errors']} errors", file=sys.stderr)
        else:
            sc: StreamScenario = spec
            # enough waves to fill --seconds; the client starts no new stream after --seconds either way
            wave = (63 * sc.delay_ms / 1000.0) or 0.005
            count = max(sc.concurrency, int(args.seconds / wave) * sc.concurrency) if sc.delay_ms else sc.count
            r = run_stream_client(url, sc, None, args.load_cpu, tmp, True, count=min(count, sc.count),
                                  max_seconds=float(args.seconds))
            print(f"streams: {r['completed']} ok, {r['failed'] + r['timeouts']} failed", file=sys.stderr)
        _, err = spy.communicate(timeout=args.seconds + 60)
        if spy.returncode != 0:
            print(f"py-spy failed: {err.decode(errors='replace')}", file=sys.stderr)
            return 1
        spy = None
        print(top_functions(Path(str(prefix) + ".txt"), args.top))
        print(f"\ncollapsed stacks (open with speedscope or flamegraph.pl): {prefix}.txt")
        return 0
    finally:
        if spy is not None and spy.poll() is None:
            spy.terminate()
            spy.wait(timeout=10)
        for p in reversed(procs):
            p.stop()


if __name__ == "__main__":
    raise SystemExit(main())
