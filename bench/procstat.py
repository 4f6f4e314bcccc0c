"""CPU time and RSS of a process, read from /proc (Linux only)."""
from __future__ import annotations

import os
import threading

__all__ = ["cpu_seconds", "rss_bytes", "RssSampler", "CLK_TCK"]

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (all its threads; children not included)."""
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

