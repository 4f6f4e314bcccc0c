"""``--workers N``: N gateway processes on one port (SO_REUSEPORT) under a small supervisor.

The supervisor restarts a worker that dies, forwards SIGHUP (reload) and SIGTERM/SIGINT (drain) to all
workers, and exits once they have exited after a stop signal.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Sequence

__all__ = ["run_workers"]


def _worker_argv(argv: Sequence[str]) -> list[str]:
    args = list(argv[1:])
    out: list[str] = []
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "--workers":
            skip = True
            continue
        if a.startswith("--workers="):
            continue
        out.append(a)
    return [sys.executable, "-m", "proxy", *out, "--workers", "1"]


def run_workers(count: int, argv: Sequence[str]) -> int:
    cmd = _worker_argv(argv)
    env = {**os.environ, "SSEGATE_REUSE_PORT": "1"}
    procs: list[subprocess.Popen[bytes]] = []
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    procs.extend(subprocess.Popen(cmd, env=env) for _ in range(count))
    print(f"ssegate supervisor: {count} workers (pids {', '.join(str(p.pid) for p in procs)})", flush=True)
    while True:
        time.sleep(0.2)
        if stopping:
            if all(p.poll() is not None for p in procs):
                return 0
            continue
        for i, p in enumerate(procs):
            if p.poll() is not None:
                print(f"ssegate supervisor: worker {p.pid} exited with {p.returncode}; restarting", flush=True)
                procs[i] = subprocess.Popen(cmd, env=env)
