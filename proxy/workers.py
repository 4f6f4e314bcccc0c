"""``--workers N``: N gateway processes on one port (SO_REUSEPORT) under a small supervisor.

The supervisor restarts a worker that dies, forwards SIGHUP (reload) and SIGTERM/SIGINT (drain) to all
workers, and exits once they have exited after a stop signal.

Restarts and giving up
    A worker that dies after running at least ``early_exit_seconds`` (default 10 s) is restarted at once.
    One that dies sooner counts as an *early exit*: it is restarted after a back-off that starts at
    ``restart_delay`` (default 0.5 s) and doubles with each further early exit in a row of the same worker,
    up to ``restart_delay_max`` (default 30 s). After ``max_early_exits`` (default 5) early exits in a row
    (a worker that cannot start: the port is taken, the config or a plugin fails in the worker) the supervisor
    gives up: it prints an ``error:`` line on stderr, stops the other workers and exits 1. With the defaults
    that is after about 7.5 s of back-off plus five start attempts. A worker that outlives
    ``early_exit_seconds`` resets its count. The environment overrides the defaults:
    ``SSEGATE_WORKER_RESTART_DELAY``, ``SSEGATE_WORKER_RESTART_DELAY_MAX``,
    ``SSEGATE_WORKER_EARLY_EXIT_SECONDS`` (seconds) and ``SSEGATE_WORKER_MAX_EARLY_EXITS`` (a count).

Stopping
    SIGTERM/SIGINT is forwarded to every worker, which drains (``server.shutdown_grace_seconds``, then up to
    10 s more to end what is left). A worker still running ``stop_timeout`` seconds after the stop (default:
    the grace plus 15 s; ``SSEGATE_WORKER_STOP_TIMEOUT`` overrides it) is stuck: the supervisor kills it with
    SIGKILL, says so on stderr, and exits 1. Without this a stuck worker kept the supervisor (and the port)
    until the orchestrator's own kill.

Exit status
    0 when, after SIGTERM/SIGINT, every worker drained and exited 0; 1 when a worker exited non-zero or was
    killed by a signal while draining (by the supervisor too), or when the supervisor gave up; 2 when a setting
    above is invalid.

Orphans
    On Linux each worker asks for ``PR_SET_PDEATHSIG`` = SIGTERM right after it is forked (before it runs
    the gateway), then checks that its parent is still the supervisor, exiting at once if the supervisor
    died in between. A supervisor killed with SIGKILL thus drains its workers instead of leaving them
    serving on the port. Elsewhere nothing is done.

Signals during startup
    The supervisor installs its handlers before it starts any worker; ``ssegate serve`` (``proxy.cli``)
    ignores SIGHUP and turns SIGTERM/SIGINT into a clean exit from its first line until then. Workers are
    started with SIGHUP ignored and SIGTERM/SIGINT blocked (both survive ``exec``): a reload forwarded to a
    worker that is still starting is dropped (it is loading the current config anyway), and a stop reaches
    it once ``ssegate serve`` has installed its startup handlers, which exit 0 (nothing is serving yet).
"""
from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import sys
import time
from typing import Callable, ClassVar, Mapping, Sequence

import attrs

__all__ = ["run_workers", "RestartPolicy"]

PR_SET_PDEATHSIG = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@attrs.frozen
class RestartPolicy:
    """When to restart a dead worker, and when to stop trying (see the module docstring)."""

    restart_delay: float = 0.5
    restart_delay_max: float = 30.0
    early_exit_seconds: float = 10.0
    max_early_exits: int = 5
    #: Seconds after a stop signal before a worker that has not exited is killed (see the module docstring).
    stop_timeout: float = 45.0

    ENV: ClassVar[dict[str, str]] = {
        "restart_delay": "SSEGATE_WORKER_RESTART_DELAY", "restart_delay_max": "SSEGATE_WORKER_RESTART_DELAY_MAX",
        "early_exit_seconds": "SSEGATE_WORKER_EARLY_EXIT_SECONDS",
        "max_early_exits": "SSEGATE_WORKER_MAX_EARLY_EXITS", "stop_timeout": "SSEGATE_WORKER_STOP_TIMEOUT"}

    @classmethod
    def from_env(cls, env: Mapping[str, str], **defaults: float) -> RestartPolicy:
        """``defaults`` (else the class's) overridden by the environment; ValueError names a bad variable."""
        values: dict[str, float | int] = dict(defaults)
        for field, var in cls.ENV.items():
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            try:
                value: float | int = int(raw) if field == "max_early_exits" else float(raw)
            except ValueError:
                value = -1
            if value < 0 or value != value or (field == "max_early_exits" and value < 1):
                expected = "a count >= 1" if field == "max_early_exits" else "a number of seconds >= 0"
                raise ValueError(f"{var}={raw!r}: expected {expected}")
            values[field] = value
        return cls(**values)  # type: ignore[arg-type]

    def backoff(self, early_exits: int) -> float:
        """The delay before restarting a worker after its ``early_exits``-th early exit in a row (>= 1)."""
        return float(min(self.restart_delay * 2 ** min(early_exits - 1, 60), self.restart_delay_max))


@attrs.define
class _Slot:
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    early_exits: int = 0
    restart_at: float = 0.0


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


def _describe(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


def _prctl() -> Callable[..., int] | None:
    """libc's ``prctl`` on Linux (resolved in the supervisor, so the forked child only calls it), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


def _child_setup(supervisor: int, prctl: Callable[..., int] | None) -> Callable[[], None]:
    """Runs in each worker right after the fork, before it executes ``ssegate serve``."""
    def setup() -> None:
        # Until ``ssegate serve`` has its own handlers: a reload is dropped, a stop waits (see the docstring).
        signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))  # survives exec
            if os.getppid() != supervisor:  # the supervisor died before the request: nothing will signal us
                os._exit(1)
    return setup


class _SignalWakeup:
    """A pipe the interpreter writes a byte to on every signal with a Python handler (``set_wakeup_fd``), SIGCHLD
    included (given a handler here), so the supervisor can sleep in ``select`` until something happens."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)
        self._previous_fd = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        self._previous_chld = signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)

    def wait(self, timeout: float | None) -> None:
        """Until a signal arrived (since the last wait too) or ``timeout`` seconds passed (None: no limit)."""
        select.select([self.read_fd], [], [], timeout)
        try:
            while os.read(self.read_fd, 512):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        signal.signal(signal.SIGCHLD, self._previous_chld)
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self.read_fd)
        os.close(self.write_fd)


def run_workers(count: int, argv: Sequence[str], policy: RestartPolicy | None = None,
                shutdown_grace_seconds: float = 30.0) -> int:
    """Run ``count`` workers of ``argv`` (``ssegate serve ...``) until stopped; returns the exit status.
    ``shutdown_grace_seconds`` (the config's) sets the default ``stop_timeout``: the grace plus 15 s."""
    received: list[int] = []

    def record(signum: int, _frame: object) -> None:
        received.append(signum)

    for sig in (*STOP_SIGNALS, signal.SIGHUP):
        signal.signal(sig, record)
    if policy is None:
        try:
            policy = RestartPolicy.from_env(os.environ, stop_timeout=shutdown_grace_seconds + 15.0)
        except ValueError as exc:
            print(f"ssegate supervisor: error: {exc}", file=sys.stderr, flush=True)
            return 2
    cmd = _worker_argv(argv)
    env = {**os.environ, "SSEGATE_REUSE_PORT": "1"}
    setup = _child_setup(os.getpid(), _prctl())
    slots = [_Slot() for _ in range(count)]
    stopping = False
    failed = False
    kill_at: float | None = None  # when workers still running after a stop are killed

    def start(slot: _Slot) -> None:
        slot.proc = subprocess.Popen(cmd, env=env, preexec_fn=setup)
        slot.started = time.monotonic()

    def say(message: str, error: bool = False) -> None:
        print(f"ssegate supervisor: {'error: ' if error else ''}{message}", file=sys.stderr if error else sys.stdout,
              flush=True)

    def stop_all() -> None:
        nonlocal stopping
        stopping = True
        for slot in slots:
            if slot.proc is not None and slot.proc.returncode is None:
                slot.proc.send_signal(signal.SIGTERM)

    wakeup = _SignalWakeup()
    try:
        if any(sig in STOP_SIGNALS for sig in received):
            return 0  # stopped before any worker was started
        received.clear()  # a reload before the workers start: they load the current config anyway
        for slot in slots:
            start(slot)
        say(f"{count} workers (pids {', '.join(str(s.proc.pid) for s in slots if s.proc is not None)})")
        while True:
            while received:
                signum = received.pop(0)
                if signum in STOP_SIGNALS:
                    stopping = True
                for slot in slots:
                    if slot.proc is not None and slot.proc.returncode is None:
                        slot.proc.send_signal(signum)
            now = time.monotonic()
            if stopping and kill_at is None:
                kill_at = now + policy.stop_timeout
            elif kill_at is not None and now >= kill_at:
                for slot in slots:
                    if slot.proc is not None and slot.proc.poll() is None:
                        say(f"worker {slot.proc.pid} still running {policy.stop_timeout:g}s after the stop; "
                            "killing it (SIGKILL)", error=True)
                        slot.proc.kill()
                        slot.proc.wait()
                kill_at = float("inf")  # once
            for index, slot in enumerate(slots):
                proc = slot.proc
                if proc is not None and proc.poll() is not None:
                    slot.proc = None
                    code, uptime = proc.returncode, now - slot.started
                    if stopping:
                        if code != 0:
                            failed = True
                            say(f"worker {proc.pid} did not drain cleanly: {_describe(code)}", error=True)
                        continue
                    if uptime >= policy.early_exit_seconds:
                        slot.early_exits, delay = 0, 0.0
                    else:
                        slot.early_exits += 1
                        if slot.early_exits >= policy.max_early_exits:
                            say(f"worker slot {index} died within {policy.early_exit_seconds:g}s of starting "
                                f"{slot.early_exits} times in a row (last: pid {proc.pid}, {_describe(code)}); "
                                "giving up (see the worker's errors above)", error=True)
                            failed = True
                            stop_all()
                            continue
                        delay = policy.backoff(slot.early_exits)
                    slot.restart_at = now + delay
                    say(f"worker {proc.pid} exited with {_describe(code)} after {uptime:.1f}s; "
                        f"restarting in {delay:g}s")
                if slot.proc is None and not stopping and now >= slot.restart_at:
                    start(slot)
                    assert slot.proc is not None
                    say(f"worker slot {index} restarted (pid {slot.proc.pid})")
            if stopping and all(slot.proc is None for slot in slots):
                return 1 if failed else 0
            # Sleep until a worker exits (SIGCHLD), a signal comes, a restart is due or a stuck worker is to be
            # killed: an idle supervisor does not wake up (a poll every 0.1 s cost ~1.7 ms of CPU a second on a VM).
            due = [slot.restart_at for slot in slots if slot.proc is None and not stopping]
            if kill_at is not None and kill_at != float("inf"):
                due.append(kill_at)
            wakeup.wait(max(0.0, min(due) - time.monotonic()) if due else None)
    finally:
        wakeup.close()
