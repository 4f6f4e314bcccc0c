"""The ``--workers N`` supervisor over real processes: restart back-off and giving up, its exit status after a
drain, its workers following it when it is killed, and signals that arrive while it (or a worker) starts."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.conftest import REPO
from tests.helpers import child_pids
from tests.redis_server import free_port

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PR_SET_PDEATHSIG")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"{what}: not reached in {timeout} s")


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


class Proc:
    """``python -m proxy serve ...`` with its output read as it comes (time-stamped), so no pipe fills up."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.started = time.monotonic()
        self.popen = subprocess.Popen([sys.executable, "-m", "proxy", "serve", *args], cwd=REPO, text=True,
                                      env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.pid = self.popen.pid
        self.out: list[tuple[float, str]] = []
        self.err: list[str] = []
        self.workers: set[int] = set()  # every worker seen, for the clean-up
        self._readers = [threading.Thread(target=self._read, args=(self.popen.stdout, True), daemon=True),
                         threading.Thread(target=self._read, args=(self.popen.stderr, False), daemon=True)]
        for t in self._readers:
            t.start()

    def _read(self, stream, timed: bool) -> None:  # type: ignore[no-untyped-def]
        for line in stream:
            if timed:
                self.out.append((time.monotonic(), line.rstrip("\n")))
            else:
                self.err.append(line.rstrip("\n"))

    def line(self, prefix: str, timeout: float = 10.0) -> tuple[float, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, text in self.out:
                if text.startswith(prefix):
                    return t, text
            if self.popen.poll() is not None and not any(t.is_alive() for t in self._readers):
                break
            time.sleep(0.02)
        pytest.fail(f"no line {prefix!r} (rc {self.popen.poll()}): {self.out} {self.err[-20:]}")

    def lines(self, contains: str) -> list[str]:
        return [text for _, text in self.out if contains in text]

    def current_workers(self) -> set[int]:
        pids = child_pids(self.pid)
        self.workers |= pids
        return pids

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running after {timeout} s: {self.out} {self.err[-20:]}")

    def kill_all(self) -> None:
        if self.popen.poll() is None:
            self.current_workers()
            self.popen.kill()
            self.popen.wait()
        for pid in self.workers:
            if alive(pid):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        ours = b"proxy" in f.read()
                    if ours:
                        os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        for t in self._readers:
            t.join(5)


@pytest.fixture
def start() -> Iterator[Callable[..., Proc]]:
    started: list[Proc] = []

    def run(*args: str, **env: str) -> Proc:
        proc = Proc(list(args), env)
        started.append(proc)
        return proc

    yield run
    for proc in started:
        proc.kill_all()


@pytest.fixture
def slow_config(tmp_path: Path) -> tuple[Path, dict[str, str], Path]:
    """A config whose loading takes 1.5 s (a plugin that sleeps on import) and writes the loading pid down."""
    package = tmp_path / "slowstart"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "load.py").write_text(
        "import os, time\n"
        "with open(os.environ['SLOWSTART_MARKER'], 'a') as f:\n"
        "    f.write(f'{os.getpid()}\\n')\n"
        "time.sleep(1.5)\n")
    config = tmp_path / "ssegate.yaml"
    config.write_text("logging: {level: warning}\n"
                      "providers: [{name: sim, type: simulated, models: ['*']}]\n"
                      "pipeline: [slowstart.load, router]\n")
    marker = tmp_path / "loading.pids"
    return config, {"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}", "SLOWSTART_MARKER": str(marker)}, marker


def loading(marker: Path) -> list[int]:
    return [int(x) for x in marker.read_text().split()] if marker.exists() else []


# -- 1. crash loop: back-off, then giving up ------------------------------------------------------------------

def test_workers_dying_at_start_are_restarted_with_backoff_then_the_supervisor_gives_up(start):
    with socket.socket() as taken:  # the port is taken (no SO_REUSEPORT): every worker fails to bind
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sup = start("--port", str(port), "--workers", "2", SSEGATE_WORKER_RESTART_DELAY="0.2",
                    SSEGATE_WORKER_RESTART_DELAY_MAX="0.5", SSEGATE_WORKER_MAX_EARLY_EXITS="4")
        _, first = sup.line("ssegate supervisor: 2 workers")
        assert sup.wait(15) == 1
    elapsed = time.monotonic() - sup.started
    for t in sup._readers:
        t.join(5)
    slot_of = {int(pid): slot for slot, pid in enumerate(first.split("(pids ")[1].rstrip(")").split(", "))}
    delays: dict[int, list[float]] = {0: [], 1: []}
    for t, text in sup.out:
        if " restarting in " in text:  # ssegate supervisor: worker <pid> exited with ... restarting in <d>s
            pid, delay = int(text.split()[3]), float(text.rsplit(" ", 1)[1].rstrip("s"))
            delays[slot_of[pid]].append(delay)
            restarted = [(t2, x) for t2, x in sup.out if x.startswith(f"ssegate supervisor: worker slot {slot_of[pid]} "
                                                                       "restarted") and t2 >= t]
            if not restarted:  # the supervisor gave up meanwhile
                continue
            assert restarted[0][0] - t >= delay - 0.05  # the back-off really was waited for
            slot_of[int(restarted[0][1].rsplit(" ", 1)[1].rstrip(")"))] = slot_of[pid]
    # doubling from 0.2 s, capped at 0.5 s; the fourth early exit in a row gives up
    assert max(delays.values(), key=len) == [0.2, 0.4, 0.5], sup.out
    assert all(d == [0.2, 0.4, 0.5][:len(d)] for d in delays.values()), sup.out
    assert len(sup.lines("restarted")) <= 6
    assert elapsed >= 1.1
    give_up = [x for x in sup.err if x.startswith("ssegate supervisor: error:")]
    assert give_up and "died within 10s of starting 4 times in a row" in give_up[0] and "giving up" in give_up[0]


def test_a_worker_that_ran_long_enough_resets_the_count_of_early_exits(start):
    port = free_port()
    sup = start("--port", str(port), "--workers", "2", SSEGATE_WORKER_RESTART_DELAY="0.1",
                SSEGATE_WORKER_EARLY_EXIT_SECONDS="1.5", SSEGATE_WORKER_MAX_EARLY_EXITS="2")
    sup.line("ssegate supervisor: 2 workers")
    wait_for(lambda: len(sup.current_workers()) == 2, what="two workers")
    known = set(sup.current_workers())

    def kill_a_fresh_one() -> None:
        victim = min(sup.current_workers())
        os.kill(victim, signal.SIGKILL)
        known.add(victim)

    def replacement() -> int:
        new: list[int] = []
        wait_for(lambda: new.extend(sup.current_workers() - known) or new, what="a replacement worker")
        known.update(new)
        return new[0]

    kill_a_fresh_one()  # early exit 1 of 2
    r1 = replacement()
    wait_for(lambda: ready(port), what="serving")
    time.sleep(1.8)
    os.kill(r1, signal.SIGKILL)  # ran 1.8 s: the count starts again
    r2 = replacement()
    os.kill(r2, signal.SIGKILL)  # early exit 1 of 2 again, not 2 of 2
    r3 = replacement()
    assert sup.popen.poll() is None
    os.kill(r3, signal.SIGKILL)  # early exit 2 of 2: give up, drain the other worker, exit 1
    assert sup.wait(10) == 1
    delays = [text.rsplit(" ", 1)[1] for text in sup.lines(" restarting in ")]
    assert delays == ["0.1s", "0s", "0.1s"], sup.out
    assert any("died within 1.5s of starting 2 times in a row" in x for x in sup.err), sup.err
    assert not any(alive(pid) for pid in sup.workers)


# -- 2. exit status after a drain ---------------------------------------------------------------------------

def test_supervisor_exits_non_zero_when_a_worker_does_not_drain_cleanly(start):
    port = free_port()
    sup = start("--port", str(port), "--workers", "2")
    sup.line("ssegate supervisor: 2 workers")
    wait_for(lambda: len(sup.current_workers()) == 2 and ready(port), what="two workers serving")
    stuck, other = sorted(sup.current_workers())
    os.kill(stuck, signal.SIGSTOP)  # cannot drain
    sup.popen.send_signal(signal.SIGTERM)
    wait_for(lambda: not alive(other), what="the other worker drained")
    os.kill(stuck, signal.SIGKILL)
    assert sup.wait(10) == 1
    assert any(f"worker {stuck} did not drain cleanly: signal SIGKILL" in x for x in sup.err), sup.err


def test_a_worker_stuck_after_the_stop_is_killed_after_the_stop_timeout(start):
    port = free_port()
    sup = start("--port", str(port), "--workers", "2", SSEGATE_WORKER_STOP_TIMEOUT="1.5")
    sup.line("ssegate supervisor: 2 workers")
    wait_for(lambda: len(sup.current_workers()) == 2 and ready(port), what="two workers serving")
    stuck, other = sorted(sup.current_workers())
    os.kill(stuck, signal.SIGSTOP)  # cannot drain, cannot exit
    stopped = time.monotonic()
    sup.popen.send_signal(signal.SIGTERM)
    assert sup.wait(10) == 1  # without the stop timeout it waits for the stuck worker forever
    assert time.monotonic() - stopped >= 1.4
    assert not alive(stuck) and not alive(other)
    assert any(f"worker {stuck} still running 1.5s after the stop; killing it" in x for x in sup.err), sup.err
    assert any(f"worker {stuck} did not drain cleanly: signal SIGKILL" in x for x in sup.err), sup.err


def test_the_stop_timeout_defaults_to_the_grace_plus_15_seconds():
    from proxy.workers import RestartPolicy

    assert RestartPolicy.from_env({}, stop_timeout=30.0 + 15.0).stop_timeout == 45.0
    assert RestartPolicy.from_env({"SSEGATE_WORKER_STOP_TIMEOUT": "2"}, stop_timeout=45.0).stop_timeout == 2.0
    with pytest.raises(ValueError, match="SSEGATE_WORKER_STOP_TIMEOUT"):
        RestartPolicy.from_env({"SSEGATE_WORKER_STOP_TIMEOUT": "soon"})


# -- 3. orphans ---------------------------------------------------------------------------------------------

def test_workers_stop_when_the_supervisor_is_killed(start):
    port = free_port()
    sup = start("--port", str(port), "--workers", "2")
    sup.line("ssegate supervisor: 2 workers")
    wait_for(lambda: len(sup.current_workers()) == 2 and ready(port), what="two workers serving")
    workers = sup.current_workers()
    sup.popen.kill()
    sup.popen.wait()
    wait_for(lambda: not any(alive(pid) for pid in workers), what="the orphaned workers exited")
    assert refused(port)


# -- 4. signals during startup ------------------------------------------------------------------------------

def test_sighup_while_the_supervisor_and_its_workers_start_is_ignored(start, slow_config):
    config, env, marker = slow_config
    port = free_port()
    sup = start("--config", str(config), "--port", str(port), "--workers", "2", **env)
    wait_for(lambda: sup.pid in loading(marker), what="the supervisor loading its config")
    sup.popen.send_signal(signal.SIGHUP)  # the supervisor loads its config: was rc 129
    sup.line("ssegate supervisor: 2 workers")
    sup.popen.send_signal(signal.SIGHUP)  # forwarded to workers that are just starting
    wait_for(lambda: len(loading(marker)) == 3, what="the workers loading their config")
    sup.popen.send_signal(signal.SIGHUP)  # forwarded to workers that load their config
    wait_for(lambda: ready(port), what="serving")
    workers = sup.current_workers()
    assert workers == set(loading(marker)[1:])  # the first workers, none restarted
    assert not sup.lines("exited"), sup.out
    sup.popen.send_signal(signal.SIGTERM)
    assert sup.wait(10) == 0


def test_sigterm_while_the_supervisor_starts_exits_0_without_workers(start, slow_config):
    config, env, marker = slow_config
    sup = start("--config", str(config), "--port", str(free_port()), "--workers", "2", **env)
    wait_for(lambda: sup.pid in loading(marker), what="the supervisor loading its config")
    sup.popen.send_signal(signal.SIGTERM)
    assert sup.wait(5) == 0
    assert loading(marker) == [sup.pid] and not sup.lines("ssegate supervisor")


def test_sigterm_while_the_workers_start_exits_0(start, slow_config):
    config, env, marker = slow_config
    sup = start("--config", str(config), "--port", str(free_port()), "--workers", "2", **env)
    sup.line("ssegate supervisor: 2 workers")
    sup.current_workers()
    sup.popen.send_signal(signal.SIGTERM)  # the workers are starting: they end cleanly, none is killed
    assert sup.wait(10) == 0, sup.err
    assert not any(alive(pid) for pid in sup.workers)


def test_single_process_ignores_sighup_and_exits_0_on_sigterm_during_startup(start, slow_config):
    config, env, marker = slow_config
    proc = start("--config", str(config), "--port", "0", **env)
    wait_for(lambda: proc.pid in loading(marker), what="loading the config")
    proc.popen.send_signal(signal.SIGHUP)
    _, line = proc.line("ssegate listening on")
    assert ready(int(line.rsplit(":", 1)[1]))
    proc.popen.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0

    marker.unlink()
    proc = start("--config", str(config), "--port", "0", **env)
    wait_for(lambda: proc.pid in loading(marker), what="loading the config")
    proc.popen.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 0
    assert not proc.lines("ssegate listening")
