"""--workers N: processes sharing one port, a dead worker replaced, signals forwarded; the metrics port."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import openai
import pytest

from tests.conftest import spawn, stop
from tests.helpers import child_pids
from tests.redis_server import free_port


def wait_for(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    pytest.fail("condition not reached in time")


def _two_workers() -> tuple[subprocess.Popen, openai.OpenAI]:
    """``ssegate serve --workers 2`` on the embedded default, both workers started, and a client for it."""
    port = free_port()
    proc, _ = spawn([sys.executable, "-m", "proxy", "serve", "--port", str(port), "--workers", "2"],
                    "ssegate supervisor: 2 workers")
    try:
        wait_for(lambda: len(child_pids(proc.pid)) == 2)
    except BaseException:
        stop(proc)
        raise
    return proc, openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=3)


def test_killed_worker_is_replaced_and_sigterm_stops_all():
    proc, client = _two_workers()
    try:

        def answers() -> bool:
            try:
                return bool(client.chat.completions.create(
                    model="gpt-4o-mini", max_tokens=3, messages=[{"role": "user", "content": "hi"}]).choices)
            except openai.APIConnectionError:
                return False

        wait_for(answers)
        first = child_pids(proc.pid)
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(child_pids(proc.pid)) == 2 and victim not in child_pids(proc.pid))
        wait_for(answers)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert child_pids(proc.pid) == set()
    finally:
        stop(proc)


def test_metrics_on_a_separate_port(tmp_path):
    port, metrics_port = free_port(), free_port()
    path = tmp_path / "c.yaml"
    path.write_text(f"observability: {{metrics_port: {metrics_port}}}\n")
    proc, _ = spawn([sys.executable, "-m", "proxy", "serve", "--config", str(path), "--port", str(port)],
                    "ssegate listening on")
    try:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            assert r.status == 200 and b"ssegate_requests_total" in r.read()
        with pytest.raises(Exception):
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/v1/models", timeout=5)
    finally:
        stop(proc)


def _wakeups(pid: int) -> int:
    """Voluntary context switches of a process's main thread: one per sleep it wakes from."""
    with open(f"/proc/{pid}/task/{pid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches in /proc")


def test_an_idle_supervisor_and_its_idle_workers_do_not_wake_up():
    """Once a request is served and nothing is live, neither the supervisor (which sleeps until a worker exits or
    a signal comes) nor a worker (no watchdog tick, no log flush tick) wakes up over 1.5 s; a timer that ticked
    every 0.25 s, or a supervisor that polled every 0.1 s, would wake 6 and 15 times."""
    proc, client = _two_workers()
    try:
        for _ in range(4):  # likely both workers serve one (the kernel spreads connections over SO_REUSEPORT)
            stream = client.chat.completions.create(model="gpt-4o-mini", max_tokens=3, stream=True,
                                                    messages=[{"role": "user", "content": "hi"}])
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        time.sleep(1.0)  # the access lines' one flush timer (0.25 s) and the watchdog's (the 15 s keepalive is
        # not reached: it was armed for the streams, which ended) have run out or stay armed without firing
        pids = [proc.pid, *child_pids(proc.pid)]
        before = {pid: _wakeups(pid) for pid in pids}
        time.sleep(1.5)
        woke = {pid: _wakeups(pid) - before[pid] for pid in pids}
        assert all(n <= 1 for n in woke.values()), woke
    finally:
        stop(proc)
