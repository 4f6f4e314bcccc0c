"""CPU time and RSS of a process, read from /proc (Linux only)."""
from __future__ import annotations

import os
import resource
import threading
import time

__all__ = ["cpu_seconds", "rss_bytes", "RssSampler", "CpuWindow", "system_busy_seconds", "CLK_TCK"]

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` in seconds, all its threads (children not included), to the nanosecond: the sum of
    its threads' ``schedstat`` run times. ``utime + stime`` of ``/proc/PID/stat`` count in clock ticks (10 ms),
    which is ±5% of a window of 16 slow streams; they stand in where schedstat is missing. (A thread that
    exited during a window is not in the sum; the proxies measured keep theirs.)"""
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                    total += int(f.read().split(None, 1)[0])
            except FileNotFoundError:  # the thread ended meanwhile
                continue
        return total / 1e9
    except (FileNotFoundError, NotADirectoryError, ValueError, IndexError):
        if not os.path.exists(f"/proc/{pid}"):
            raise
        return tick_cpu_seconds(pid)


def tick_cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (all its threads; children not included), in clock ticks."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(b")") + 2:].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / CLK_TCK


def rss_bytes(pid: int) -> int:
    """Resident set size (VmRSS) of ``pid`` in bytes."""
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class RssSampler:
    """Samples VmRSS of a process in a background thread; ``peak`` is the highest value seen."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.start_rss = rss_bytes(pid)
        self.peak = self.start_rss
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                value = rss_bytes(self.pid)
            except OSError:
                return
            self.samples += 1
            if value > self.peak:
                self.peak = value
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.peak = max(self.peak, rss_bytes(self.pid))
        except OSError:
            pass



def system_busy_seconds() -> float:
    """CPU seconds spent in user, nice and system mode by all CPUs since boot (from /proc/stat).

    irq/softirq time is left out: loopback networking is partly accounted there without belonging to any
    process, and steal time is the hypervisor's.
    """
    with open("/proc/stat", "rb") as f:
        fields = f.readline().split()
    user, nice, system = int(fields[1]), int(fields[2]), int(fields[3])
    return (user + nice + system) / CLK_TCK


def steal_seconds() -> float:
    """CPU time stolen from this virtual machine by the hypervisor, all CPUs, since boot."""
    with open("/proc/stat", "rb") as f:
        fields = f.readline().split()
    return int(fields[8]) / CLK_TCK if len(fields) > 8 else 0.0


def own_cpu_seconds() -> float:
    """CPU time of this process and of its waited-for children."""
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class CpuWindow:
    """CPU used by the process under test over a window, and by processes that are not part of the benchmark.

    ``foreign_cpu_s`` = all CPUs' busy time - the measured process - the known benchmark processes (mock,
    idle peer proxy) - this process and its children (wrk). A clean window has it near 0; other work on the
    machine (a test suite, a build) shows up there, and the measurement is then suspect.
    """

    def __init__(self, pid: int, known_pids: tuple[int, ...] = ()) -> None:
        self.pid = pid
        self.known = tuple(p for p in known_pids if p)

    def _known(self) -> float:
        total = 0.0
        for p in self.known:
            try:
                total += cpu_seconds(p)
            except OSError:
                pass
        return total

    def start(self) -> "CpuWindow":
        self.t0 = time.monotonic()
        self.busy0 = system_busy_seconds()
        self.steal0 = steal_seconds()
        self.own0 = own_cpu_seconds()
        self.known0 = self._known()
        self.cpu0 = cpu_seconds(self.pid)
        return self

    def stop(self) -> dict[str, float]:
        cpu = cpu_seconds(self.pid) - self.cpu0
        known = self._known() - self.known0
        own = own_cpu_seconds() - self.own0
        busy = system_busy_seconds() - self.busy0
        steal = steal_seconds() - self.steal0
        wall = time.monotonic() - self.t0
        foreign = max(0.0, busy - cpu - known - own)
        return {"proxy_cpu_s": cpu, "wall_s": wall, "bench_other_cpu_s": known + own, "foreign_cpu_s": foreign,
                "foreign_cores": foreign / wall if wall > 0 else 0.0,
                "steal_cores": steal / wall if wall > 0 else 0.0}
