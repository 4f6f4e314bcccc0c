"""The benchmark driver: ``python -m bench [--quick] [--ref REF]``.

Starts the mock upstream (core 1), the bare passthrough and the gateway (both on core 0), and drives the same
load through each proxy in turn, one at a time (the other one sits idle): ``wrk`` for non-stream requests,
``bench/stream_client.py`` for 64-chunk streams (both on core 1). Scenarios alternate between the two proxies
so that a disturbance of the machine hits both alike. Proxy CPU is the delta of utime+stime in
``/proc/<pid>/stat`` over each measured window, divided by the requests or streams completed in it. Each window
also measures the machine's CPU used by processes outside the benchmark ("foreign" load: another test suite,
a build) and the CPU time the hypervisor stole from this VM for other guests ("steal"); a window with more
than 0.1 core of either is measured again, within a bounded retry budget, and the cleanest attempt is kept
(still-noisy cells are marked). TTFT through each proxy is compared with TTFT straight
to the mock. Prints a markdown table and writes ``bench/results/<timestamp>.json``.

Every child process is stopped at the end, on error and on SIGINT/SIGTERM too (and dies with this process if
it is killed: PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import json
import os
import platform
import random
import re
import resource
import shutil
import statistics
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

from bench.procstat import CpuWindow, rss_bytes
from bench.stream_client import CONTENT_CHUNKS, percentile

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGET_RATIO = 1.3
FOREIGN_THRESHOLD = 0.10  # cores of foreign load above which a measured window is retried / marked noisy
STEAL_THRESHOLD = 0.10  # cores the hypervisor stole from this VM during a window, above which the same applies


def disturbed(window: dict[str, Any]) -> bool:
    """Whether a measured window ran on a disturbed machine: foreign load inside this VM, or CPU time the
    hypervisor gave to other guests (steal time: a busy host; the proxy then loses its caches between slices
    and costs more per request)."""
    return window["foreign_cores"] > FOREIGN_THRESHOLD or window.get("steal_cores", 0.0) > STEAL_THRESHOLD


def _disturbance(window: dict[str, Any]) -> float:
    return max(window["foreign_cores"] / FOREIGN_THRESHOLD, window.get("steal_cores", 0.0) / STEAL_THRESHOLD)
NON_STREAM_BODY = '{"model":"bench-model","messages":[{"role":"system","content":"You are a benchmark."},' \
                  '{"role":"user","content":"Say hello."}]}'
PROXIES = ("passthrough", "gateway")
#: The third contender of the non-stream rows: the same gateway with its access line and metrics turned off, so
#: every run shows what the two observability plugins cost and where the gateway stands without them.
NO_OBS = "gateway_no_obs"
NO_OBS_ENV = {"SSEGATE_OBSERVABILITY__ACCESS_LOG": "false", "SSEGATE_OBSERVABILITY__METRICS": "false"}


def conversation_body(size: int) -> str:
    """A chat request of at least ``size`` bytes: the benchmark's system turn, earlier user and assistant turns of
    plain text, then its user turn, as a front end sends a long conversation. ``NON_STREAM_BODY`` itself when
    ``size`` is not larger."""
    short = json.loads(NON_STREAM_BODY)
    if size <= len(NON_STREAM_BODY):
        return NON_STREAM_BODY
    system, question = short["messages"]
    turn = "A streaming gateway relays each server-sent event to the client as soon as it arrives. " * 4
    history: list[dict[str, str]] = []
    body = NON_STREAM_BODY
    while len(body) < size:
        history += [{"role": "user", "content": turn}, {"role": "assistant", "content": turn}]
        body = json.dumps({**short, "messages": [system, *history, question]}, separators=(",", ":"))
    return body


# -- plans ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamScenario:
    key: str
    label: str
    concurrency: int
    count: int
    delay_ms: float
    warmup: int


@dataclass(frozen=True)
class Plan:
    name: str
    wrk_warmup_s: int
    wrk_seconds: int
    concurrencies: tuple[int, ...]
    streams: tuple[StreamScenario, ...]
    ttft_count: int  # streams per target, split over ttft_rounds interleaved rounds
    ttft_rounds: int
    retry_budget_s: float  # total time that re-measurements of noisy windows may take
    quiet_budget_s: float  # total time spent waiting for foreign load to drop before measuring
    max_retries: int = 2  # re-measurements of one noisy window, at most
    max_quiet_wait_s: float = 15.0  # one wait for quiet, at most
    ttft_delay_ms: float = 20.0
    #: Non-stream windows per proxy and concurrency, interleaved between the proxies; the cell is their median.
    wrk_rounds: int = 1
    #: Stream windows per proxy and scenario (``count`` streams each), interleaved; the cell is their median.
    stream_rounds: int = 1
    #: Non-stream requests whose body is a conversation of this many bytes at least, at ``long_concurrency``:
    #: what chat front ends send (the short request hides the cost of validating a long body). 0: no such row.
    long_body_bytes: int = 16384
    long_concurrency: int = 16
    #: Also measure the gateway without its access line and metrics (:data:`NO_OBS`) in the non-stream rows
    #: (``--with-no-obs``; off by default, so the time goes to more rounds of the two contenders judged).
    no_obs: bool = False


FULL = Plan(
    name="full", wrk_warmup_s=2, wrk_seconds=2, wrk_rounds=16, stream_rounds=8, concurrencies=(1, 16, 64),
    streams=(
        # 1,500 streams a window (~2 s, as the non-stream windows): at 500 (~0.7 s) the windows of one build
        # spread ±30% and the row's interval was 0.2-0.3 wide (runs T-Y).
        StreamScenario("stream_c1", "stream C=1, no delay", 1, 1500, 0, 50),
        StreamScenario("stream_c200", "stream C=200, 20 ms/chunk", 200, 1000, 20, 200),
        StreamScenario("stream_c1000", "stream C=1000, 100 ms/chunk (one wave)", 1000, 1000, 100, 1000),
    ),
    ttft_count=80, ttft_rounds=4, retry_budget_s=45, quiet_budget_s=30,
)
QUICK = Plan(
    name="quick", wrk_warmup_s=1, wrk_seconds=3, stream_rounds=2, concurrencies=(1, 16, 64),
    streams=(
        StreamScenario("stream_c1", "stream C=1, no delay", 1, 150, 0, 20),
        StreamScenario("stream_c200", "stream C=100, 20 ms/chunk", 100, 100, 20, 100),
        StreamScenario("stream_c1000", "stream C=300, 100 ms/chunk (one wave)", 300, 300, 100, 300),
    ),
    ttft_count=8, ttft_rounds=2, retry_budget_s=6, quiet_budget_s=4, max_retries=1, max_quiet_wait_s=2,
)


class BenchError(RuntimeError):
    pass


# -- processes --------------------------------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    """In the child before exec: die with the benchmark; own session so a terminal ^C reaches only us."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    os.setsid()


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by every child
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A pinned child process whose output goes to a log file."""

    def __init__(self, name: str, argv: list[str], cpu: int, port: int, logdir: Path,
                 env: dict[str, str] | None = None, cwd: Path = ROOT) -> None:
        self.name, self.argv, self.cpu, self.port = name, argv, cpu, port
        self.log_path = logdir / f"{name}.log"
        self.env, self.cwd = env, cwd
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self, ready_timeout: float = 20.0) -> "Proc":
        log = open(self.log_path, "wb")
        try:
            self.popen = subprocess.Popen(["taskset", "-c", str(self.cpu), *self.argv], stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.cwd,
                                          env=self.env, preexec_fn=_child_setup)
        finally:
            log.close()
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.popen.returncode} at start:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        raise BenchError(f"{self.name} did not listen on 127.0.0.1:{self.port} within {ready_timeout}s:\n"
                         f"{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        p = self.popen
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(timeout=8)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)


# -- load generators ------------------------------------------------------------------------------------------
_WRK_LUA = """
wrk.method = "POST"
wrk.body = [==[%s]==]
wrk.headers["Content-Type"] = "application/json"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH_RESULT requests=%%d duration_us=%%d connect=%%d read=%%d write=%%d status=%%d timeout=%%d p50_us=%%d p99_us=%%d\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def write_wrk_script(tmpdir: Path, body: str = NON_STREAM_BODY) -> Path:
    """wrk's Lua script: POST ``body`` (a long-bracket string, so quotes in it need no escaping)."""
    if "]==]" in body:
        raise BenchError("the request body cannot contain ]==]")
    path = tmpdir / f"post-{len(body)}.lua"
    path.write_text(_WRK_LUA % body)
    return path


def run_wrk(url: str, concurrency: int, seconds: int, script: Path, cpu: int) -> dict[str, Any]:
    cmd = ["taskset", "-c", str(cpu), "wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "10s",
           "-s", str(script), url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, stdin=subprocess.DEVNULL)
    m = re.search(r"BENCH_RESULT (.*)", proc.stdout)
    if proc.returncode != 0 or m is None:
        raise BenchError(f"wrk failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    values = {k: int(v) for k, v in (kv.split("=") for kv in m.group(1).split())}
    values["errors"] = sum(values[k] for k in ("connect", "read", "write", "status", "timeout"))
    return values


def run_stream_client(url: str, sc: StreamScenario, pid: int | None, cpu: int, tmpdir: Path,
                      include_usage: bool, delay_ms: float | None = None, count: int | None = None,
                      warmup: int | None = None, concurrency: int | None = None,
                      other_pids: tuple[int, ...] = (), max_seconds: float | None = None) -> dict[str, Any]:
    delay = sc.delay_ms if delay_ms is None else delay_ms
    n = sc.count if count is None else count
    c = sc.concurrency if concurrency is None else concurrency
    out = tmpdir / f"stream-{time.monotonic_ns()}.json"
    per_stream = 60.0
    waves = -(-n // c)
    if max_seconds is None:  # no new stream starts after this; generous for the plan's counts
        max_seconds = waves * ((CONTENT_CHUNKS - 1) * delay / 1000.0 + 10.0) + 30.0
    cmd = ["taskset", "-c", str(cpu), sys.executable, "-m", "bench.stream_client", "--url", url,
           "--concurrency", str(c), "--count", str(n), "--delay-ms", str(delay),
           "--warmup", str(sc.warmup if warmup is None else warmup), "--timeout", str(per_stream),
           "--max-seconds", str(max_seconds), "--out", str(out)]
    if pid:
        cmd += ["--pid", str(pid)]
        for other in other_pids:
            cmd += ["--other-pid", str(other)]
    if not include_usage:
        cmd.append("--no-include-usage")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, stdin=subprocess.DEVNULL,
                          timeout=2 * max_seconds + 2 * per_stream + 60, preexec_fn=_child_setup)
    if proc.returncode != 0 or not out.exists():
        raise BenchError(f"stream client failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(out.read_text())


# -- sanity checks ----------------------------------------------------------------------------------------------
def check_target(base_url: str, name: str) -> None:
    """One non-stream and one stream request, answered correctly, before any load."""
    url = base_url + "/v1/chat/completions"
    req = urllib.request.Request(url, data=NON_STREAM_BODY.encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        body = json.loads(resp.read())
        if resp.status != 200 or body.get("object") != "chat.completion":
            raise BenchError(f"{name}: unexpected non-stream answer {resp.status}: {body}")
    stream_body = json.dumps({**json.loads(NON_STREAM_BODY), "stream": True,
                              "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(url, data=stream_body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        raw = resp.read()
    events = [e for e in raw.replace(b"\r\n", b"\n").split(b"\n\n") if e.startswith(b"data:")]
    content = sum(1 for e in events if b'"delta":{"content":"' in e)
    if content != CONTENT_CHUNKS or events[-1].strip() != b"data: [DONE]":
        raise BenchError(f"{name}: stream had {content} content chunks (want {CONTENT_CHUNKS}), "
                         f"last event {events[-1][:80]!r}")


# -- the run ----------------------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fmt(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{v:,.{digits}f}"


class Bench:
    """One run: the processes, the retry budget, and the measurements."""

    def __init__(self, plan: Plan, args: argparse.Namespace, tmpdir: Path) -> None:
        self.plan, self.args, self.tmpdir = plan, args, tmpdir
        self.mock: Proc | None = None
        self.proxies: dict[str, Proc] = {}
        self.retry_left = plan.retry_budget_s
        self.quiet_left = plan.quiet_budget_s
        self.wrk_script = write_wrk_script(tmpdir)
        self.long_body = conversation_body(plan.long_body_bytes) if plan.long_body_bytes else ""
        self.long_script = write_wrk_script(tmpdir, self.long_body) if self.long_body else None
        #: The proxies of the non-stream rows: the two, and the gateway without observability when planned.
        self.non_stream_names = (*PROXIES, NO_OBS) if plan.no_obs else PROXIES
        self.results: dict[str, dict[str, Any]] = {name: {"non_stream": {}, "streams": {}}
                                                   for name in self.non_stream_names}

    def url(self, name: str) -> str:
        proc = self.mock if name == "direct" else self.proxies[name]
        assert proc is not None
        return f"http://127.0.0.1:{proc.port}/v1/chat/completions"

    def others(self, name: str) -> tuple[int, ...]:
        """Benchmark processes other than ``name``: their CPU is not foreign load."""
        procs = [self.mock, *self.proxies.values()]
        return tuple(p.pid for p in procs if p is not None and p.name != name)

    def foreign_cores(self, seconds: float = 0.3) -> float:
        """Foreign load right now: CPU used over ``seconds`` by processes outside the benchmark."""
        assert self.mock is not None
        window = CpuWindow(self.mock.pid, self.others("mock_upstream")).start()
        time.sleep(seconds)
        return window.stop()["foreign_cores"]

    def wait_quiet(self, what: str) -> None:
        """Before a measurement: wait (bounded) until the machine carries no foreign load."""
        if self.quiet_left <= 0:
            return
        t0 = time.monotonic()
        limit = min(self.quiet_left, self.plan.max_quiet_wait_s)
        load = self.foreign_cores()
        while load > FOREIGN_THRESHOLD and time.monotonic() - t0 < limit:
            load = self.foreign_cores()
        spent = time.monotonic() - t0
        self.quiet_left -= spent
        if load > FOREIGN_THRESHOLD:
            log(f"  ~ {what}: waited {spent:.0f}s, foreign load still {load:.2f} cores; measuring anyway")

    def with_retries(self, what: str, attempt: Callable[[], dict[str, Any]],
                     value_key: str) -> dict[str, Any]:
        """Measure; while the window was disturbed (:func:`disturbed`: foreign load, or steal time) and the
        bounded retry budget allows, measure again. Keeps the least disturbed attempt."""
        attempts = []
        while True:
            self.wait_quiet(what)
            t0 = time.monotonic()
            r = attempt()
            took = time.monotonic() - t0
            attempts.append(r)
            if not disturbed(r):
                break
            why = f"{r['foreign_cores']:.2f} cores of foreign load, {r.get('steal_cores', 0.0):.2f} stolen"
            if len(attempts) > self.plan.max_retries or took > self.retry_left:
                log(f"  ~ {what}: {why}; no retry left")
                break
            self.retry_left -= took
            log(f"  ~ {what}: {why} during the window ({r.get(value_key) and round(r[value_key], 3)}); "
                "measuring again")
        best = min(attempts, key=_disturbance)
        best["noisy"] = disturbed(best)
        best["attempts"] = [{"foreign_cores": a["foreign_cores"], "steal_cores": a.get("steal_cores"),
                             value_key: a.get(value_key)} for a in attempts]
        return best

    def non_stream_window(self, name: str, c: int, script: Path | None = None, what: str = "") -> dict[str, Any]:
        """One measured wrk window against one proxy (re-measured while foreign load spoils it); ``script``: the
        wrk script (default: the short request), ``what``: how the log names a non-default one."""
        plan, args = self.plan, self.args
        script = script or self.wrk_script
        proc = self.proxies[name]
        url = self.url(name)

        def attempt() -> dict[str, Any]:
            window = CpuWindow(proc.pid, self.others(name)).start()
            w = run_wrk(url, c, plan.wrk_seconds, script, args.load_cpu)
            w.update(window.stop())
            secs = w["duration_us"] / 1e6
            cpu = w["proxy_cpu_s"]
            w.update(us_per_request=cpu / w["requests"] * 1e6 if w["requests"] else None,
                     requests_per_s=w["requests"] / secs if secs else None,
                     proxy_core_busy=cpu / secs if secs else None)
            return w

        w = self.with_retries(f"{name} non-stream c={c}{what}", attempt, "us_per_request")
        log(f"  {name:14s} non-stream c={c:<3d}{what} {w['requests']:7d} req  {w['requests_per_s']:8.0f} req/s  "
            f"CPU {fmt(w['us_per_request'])} us/req  errors {w['errors']}  foreign {w['foreign_cores']:.2f}  "
            f"steal {w.get('steal_cores', 0.0):.2f}")
        if w["errors"]:
            log(f"  !!! {name}: wrk reported {w['errors']} errors/non-2xx responses at c={c}: {w}")
        return w

    def non_stream(self, c: int, order: Callable[[tuple[str, ...]], tuple[str, ...]], long: bool = False) -> None:
        """``plan.wrk_rounds`` windows per proxy, interleaved (the order rotates), so a drift of the machine
        hits all alike; each cell is the median window, with every window kept in the results. ``long``: the
        long conversation instead of the short request (cell ``c<C>_long``)."""
        script = self.long_script if long else self.wrk_script
        assert script is not None
        what = f" ({len(self.long_body):,}-byte body)" if long else ""
        names = self.non_stream_names
        for name in names:
            run_wrk(self.url(name), c, self.plan.wrk_warmup_s, script, self.args.load_cpu)  # warm-up
        windows: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for _ in range(self.plan.wrk_rounds):
            for name in order(names):
                windows[name].append(self.non_stream_window(name, c, script, what))
        for name, ws in windows.items():
            ranked = sorted(ws, key=lambda w: w["us_per_request"] or 0.0)
            median = dict(ranked[len(ranked) // 2])
            median.update(rounds=[{k: w.get(k) for k in ("us_per_request", "requests", "requests_per_s",
                                                         "foreign_cores", "steal_cores", "errors")}
                                      for w in ws],
                          errors=sum(w["errors"] for w in ws), noisy=any(w["noisy"] for w in ws))
            if len(ws) > 1:
                log(f"  {name:14s} non-stream c={c:<3d}{what} median of {len(ws)}: CPU "
                    f"{fmt(median['us_per_request'])} us/req (windows {fmt(ranked[0]['us_per_request'])}-"
                    f"{fmt(ranked[-1]['us_per_request'])})")
            self.results[name]["non_stream"][f"c{c}_long" if long else f"c{c}"] = median

    def streams(self, sc: StreamScenario, order: Callable[[tuple[str, ...]], tuple[str, ...]]) -> None:
        """``plan.stream_rounds`` windows of ``sc`` per proxy, interleaved like the non-stream windows. A single
        window moves a lot: how many upstream reads carry a stream's 64 chunks (so what a stream costs the
        proxy) depends on how punctually the mock, sharing its core with the load, writes them. The cell is the
        median window; counts and failures are summed over the windows, the peak RSS is their maximum."""
        windows: dict[str, list[dict[str, Any]]] = {name: [] for name in PROXIES}
        for _ in range(self.plan.stream_rounds):
            for name in order(PROXIES):
                windows[name].append(self.stream_window(name, sc))
                time.sleep(0.5)
        for name, ws in windows.items():
            ranked = sorted(ws, key=lambda w: w["ms_per_stream"] or 0.0)
            median = dict(ranked[len(ranked) // 2])
            if len(ws) > 1:
                for key in ("completed", "failed", "timeouts", "not_run", "incremental_scored", "incremental_ok"):
                    median[key] = sum(w[key] for w in ws)
                median.update(proxy_rss_peak=max(w["proxy_rss_peak"] for w in ws),
                              noisy=any(w.get("noisy") for w in ws),
                              rounds=[{k: w.get(k) for k in ("ms_per_stream", "completed", "foreign_cores", "steal_cores")}
                                      for w in ws])
                median.pop("ttft_s", None)
                log(f"  {name:14s} {sc.label:40s} median of {len(ws)}: CPU {fmt(median['ms_per_stream'], 3)} "
                    f"ms/stream (windows {fmt(ranked[0]['ms_per_stream'], 3)}-{fmt(ranked[-1]['ms_per_stream'], 3)})")
            self.results[name]["streams"][sc.key] = median

    def stream_window(self, name: str, sc: StreamScenario) -> dict[str, Any]:
        proc = self.proxies[name]

        def attempt() -> dict[str, Any]:
            r = run_stream_client(self.url(name), sc, proc.pid, self.args.load_cpu, self.tmpdir,
                                  self.args.include_usage, other_pids=self.others(name))
            done = r["completed"]
            r["ms_per_stream"] = r["proxy_cpu_s"] / done * 1000 if done else None
            r["proxy_core_busy"] = r["proxy_cpu_s"] / r["wall_s"] if r["wall_s"] else None
            return r

        r = self.with_retries(f"{name} {sc.label}", attempt, "ms_per_stream")
        inc = f"{r['incremental_ok']}/{r['incremental_scored']}" if r["incremental_scored"] else "n/a"
        log(f"  {name:14s} {sc.label:40s} {r['completed']:5d}/{sc.count} ok  CPU {fmt(r['ms_per_stream'], 3)} "
            f"ms/stream  incremental {inc}  peak RSS {r['proxy_rss_peak'] / 2**20:.0f} MiB  "
            f"foreign {r['foreign_cores']:.2f}  steal {r.get('steal_cores', 0.0):.2f}")
        bad = r["failed"] + r["timeouts"] + r["not_run"]
        if bad:
            log(f"  !!! {name}: {bad} streams failed in {sc.label}: {r['errors']}")
        return r

    def ttft(self) -> dict[str, dict[str, Any]]:
        """C=1 streams with a delay, in interleaved rounds over direct, passthrough and gateway."""
        plan = self.plan
        per_round = max(1, plan.ttft_count // plan.ttft_rounds)
        sc = StreamScenario("ttft", f"stream C=1, {plan.ttft_delay_ms:.0f} ms/chunk", 1, per_round,
                            plan.ttft_delay_ms, 3)
        names = ["direct", *PROXIES]
        runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for i in range(plan.ttft_rounds):
            order = names[i % len(names):] + names[:i % len(names)]
            self.wait_quiet(f"TTFT round {i + 1}")
            for name in order:
                pid = self.mock.pid if name == "direct" else self.proxies[name].pid  # type: ignore[union-attr]
                runs[name].append(run_stream_client(self.url(name), sc, pid, self.args.load_cpu, self.tmpdir,
                                                    self.args.include_usage, other_pids=self.others(
                                                        "mock_upstream" if name == "direct" else name)))
        merged = {name: merge_runs(rs) for name, rs in runs.items()}
        for name in names:
            m = merged[name]
            log(f"  {name:14s} TTFT {sc.label}: p50 {fmt(m['ttft_p50_ms'], 2)} ms  p99 {fmt(m['ttft_p99_ms'], 2)} ms"
                f"  ({m['completed']}/{plan.ttft_count} ok)  foreign max {m['foreign_cores']:.2f}")
        return merged


def merge_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge several stream-client results of the same scenario."""
    out: dict[str, Any] = {"runs": len(runs)}
    for key in ("completed", "failed", "timeouts", "not_run", "incremental_scored", "incremental_ok",
                "proxy_cpu_s", "wall_s", "foreign_cpu_s"):
        out[key] = sum(r.get(key) or 0 for r in runs)
    errors: dict[str, int] = {}
    for r in runs:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    out["errors"] = errors
    out["ttft_s"] = [t for r in runs for t in r["ttft_s"]]
    out["ttft_p50_ms"] = None if not out["ttft_s"] else percentile(out["ttft_s"], 50) * 1000  # type: ignore[operator]
    out["ttft_p99_ms"] = None if not out["ttft_s"] else percentile(out["ttft_s"], 99) * 1000  # type: ignore[operator]
    out["foreign_cores"] = max(r.get("foreign_cores", 0.0) for r in runs)
    out["ms_per_stream"] = out["proxy_cpu_s"] / out["completed"] * 1000 if out["completed"] else None
    return out


def start_mock_upstream(logdir: Path, cpu: int = 1) -> Proc:
    """The mock upstream (``bench.mock_upstream``) on a free port, pinned to ``cpu``, started; its port is
    ``.port``."""
    port = free_port()
    return Proc("mock_upstream", [sys.executable, "-m", "bench.mock_upstream", "--port", str(port)], cpu, port,
                logdir).start()


def gateway_config(path: Path, port: int, upstream_port: int) -> None:
    path.write_text(f"""\
# Generated by python -m bench: one openai-type provider pointing at the mock upstream.
server:
  host: 127.0.0.1
  port: {port}
streaming:
  keepalive: true
  keepalive_interval: 15
logging:
  level: info
  format: json
providers:
  - name: mock
    type: openai
    base_url: http://127.0.0.1:{upstream_port}/v1
    models: ["*"]
    timeout: 600
    connect_timeout: 30
    max_connections: 2000
    max_keepalive_connections: 2000
    keepalive_expiry: 60
pipeline:
  - router
""")


def export_ref(ref: str, dest: Path) -> str:
    """Extract ``proxy/`` and ``plugins/`` of a git ref into ``dest``; returns the commit id."""
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=ROOT, capture_output=True,
                         text=True)
    if sha.returncode != 0:
        raise BenchError(f"unknown git ref {ref!r}: {sha.stderr.strip()}")
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", "--format=tar", sha.stdout.strip(), "proxy", "plugins"], cwd=ROOT,
                             capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return sha.stdout.strip()


def gateway_command(config: Path, src: Path | None, extra_env: dict[str, str] | None = None
                    ) -> tuple[list[str], dict[str, str], Path]:
    """argv, environment and cwd of the gateway: the installed ``ssegate`` (the work tree, for an editable
    install), or ``python -m proxy`` from an exported source tree; ``extra_env``: ``SSEGATE_*`` settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSEGATE_")}
    env.update(extra_env or {})
    if src is None:
        return gateway_argv(config), env, ROOT
    env["PYTHONPATH"] = str(src)
    return [sys.executable, "-m", "proxy", "serve", "--config", str(config)], env, src


def gateway_argv(config: Path) -> list[str]:
    script = Path(sys.executable).with_name("ssegate")
    if not script.exists():
        found = shutil.which("ssegate")
        script = Path(found) if found else script
    if script.exists():
        return [str(script), "serve", "--config", str(config)]
    log("note: `ssegate` is not on PATH (pip install -e .); using python -m proxy serve")
    return [sys.executable, "-m", "proxy", "serve", "--config", str(config)]


def machine_info() -> dict[str, Any]:
    def version(mod: str) -> str | None:
        try:
            from importlib.metadata import version as v
            return v(mod)
        except Exception:
            return None

    model = None
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "proxy", "plugins"], cwd=ROOT,
                           capture_output=True, text=True)
    return {"cpus": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "python": platform.python_version(), "aiohttp": version("aiohttp"), "uvloop": version("uvloop"),
            "orjson": version("orjson"), "ssegate": version("ssegate"),
            "git_commit": commit.stdout.strip() or None, "proxy_tree_dirty": bool(dirty.stdout.strip()),
            "wrk": subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split("\n")[0].strip()}


def build_rows(plan: Plan, res: dict[str, dict[str, Any]], ttft: dict[str, dict[str, Any]],
               rss_idle: dict[str, int]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    pt, gw = res["passthrough"], res["gateway"]

    def cell(m: dict[str, Any], key: str, digits: int) -> str:
        return fmt(m.get(key), digits) + (" †" if m.get("noisy") else "")

    def cpu_row(label: str, a: dict[str, Any], b: dict[str, Any], key: str, digits: int) -> None:
        va, vb = a.get(key), b.get(key)
        ratio = vb / va if va and vb is not None else None
        pair = paired_ratio(a, b, key)
        interval = paired_interval(a, b, key)
        paired = "" if pair is None else f"{pair:.2f}x"
        if interval is not None:
            paired += f" ({interval[0]:.2f}-{interval[1]:.2f})"
        rows.append({"scenario": label, "passthrough": cell(a, key, digits), "gateway": cell(b, key, digits),
                     "ratio": "n/a" if ratio is None else f"{ratio:.2f}x", "paired": paired,
                     "target": verdict(ratio, interval), "ratio_value": ratio, "paired_value": pair,
                     "paired_interval": interval, "is_cpu": True})

    def info_row(label: str, a: str, b: str, ratio: str = "") -> None:
        rows.append({"scenario": label, "passthrough": a, "gateway": b, "ratio": ratio, "paired": "",
                     "target": "", "ratio_value": None, "paired_value": None, "is_cpu": False})

    non_stream_keys = [(f"c{c}", f"non-stream c={c}") for c in plan.concurrencies]
    k = f"c{plan.long_concurrency}_long"
    if k in pt["non_stream"] and k in gw["non_stream"]:
        size = len(conversation_body(plan.long_body_bytes))
        non_stream_keys.append((k, f"non-stream c={plan.long_concurrency}, a {size:,}-byte conversation"))
    for k, label in non_stream_keys:
        cpu_row(f"{label}: CPU us/request", pt["non_stream"][k], gw["non_stream"][k], "us_per_request", 1)
    no_obs = res.get(NO_OBS)
    if no_obs is not None:
        # Not the target's rows (the gateway as shipped is): what the access line and metrics cost.
        for k, label in non_stream_keys:
            cpu_row(f"{label}, gateway without access line and metrics: CPU us/request", pt["non_stream"][k],
                    no_obs["non_stream"][k], "us_per_request", 1)
            rows[-1]["variant"] = True
    for sc in plan.streams:
        cpu_row(f"{sc.label}: CPU ms/stream", pt["streams"][sc.key], gw["streams"][sc.key], "ms_per_stream", 3)
    cpu_row(f"stream C=1, {plan.ttft_delay_ms:.0f} ms/chunk (the TTFT runs): CPU ms/stream", ttft["passthrough"],
            ttft["gateway"], "ms_per_stream", 3)
    top = f"c{plan.concurrencies[-1]}"
    a, b = pt["non_stream"][top]["requests_per_s"], gw["non_stream"][top]["requests_per_s"]
    info_row(f"non-stream c={plan.concurrencies[-1]}: throughput req/s (proxy on 1 core)", fmt(a, 0), fmt(b, 0),
             f"{b / a:.2f}x" if a and b else "")
    direct = ttft["direct"]
    for q in (50, 99):
        d = direct.get(f"ttft_p{q}_ms")
        vals = []
        for name in PROXIES:
            v = ttft[name].get(f"ttft_p{q}_ms")
            vals.append(None if v is None or d is None else v - d)
        info_row(f"added TTFT p{q} (ms), C=1, {plan.ttft_delay_ms:.0f} ms/chunk (direct p{q}: {fmt(d, 2)} ms)",
                 fmt(vals[0], 2), fmt(vals[1], 2))
    for sc in plan.streams:
        if sc.delay_ms > 0:
            cells = []
            for t in (pt, gw):
                r = t["streams"][sc.key]
                n = r["incremental_scored"]
                cells.append(f"{100 * r['incremental_ok'] / n:.1f}% ({r['incremental_ok']}/{n})" if n else "n/a")
            info_row(f"incremental share, {sc.label}", *cells)
    cells = []
    for name in PROXIES:
        t = res[name]
        n = sum(w["errors"] for w in t["non_stream"].values())
        n += sum(r["failed"] + r["timeouts"] + r["not_run"] for r in [*t["streams"].values(), ttft[name]])
        if name == "gateway" and no_obs is not None:  # the gateway's column counts both of its configurations
            n += sum(w["errors"] for w in no_obs["non_stream"].values())
        cells.append(str(n))
    info_row("failures (non-2xx, socket errors, failed/timed-out streams)", *cells)
    big = plan.streams[-1]
    a, b = pt["streams"][big.key]["proxy_rss_peak"] / 2**20, gw["streams"][big.key]["proxy_rss_peak"] / 2**20
    info_row(f"peak RSS (MiB), {big.label}", f"{a:.0f}", f"{b:.0f}", f"{b / a:.2f}x")
    a, b = rss_idle["passthrough"] / 2**20, rss_idle["gateway"] / 2**20
    info_row("idle RSS after start (MiB)", f"{a:.0f}", f"{b:.0f}", f"{b / a:.2f}x")
    return rows


def _round_ratios(a: dict[str, Any], b: dict[str, Any], key: str) -> list[float]:
    """The per-round ratios ``b / a`` of two contenders' windows (``rounds``: the windows of each round ran back to
    back, interleaved); empty without two rounds or more."""
    ra, rb = a.get("rounds"), b.get("rounds")
    if not ra or not rb or len(ra) != len(rb) or len(ra) < 2:
        return []
    return sorted(y[key] / x[key] for x, y in zip(ra, rb) if x.get(key) and y.get(key) is not None)


def paired_ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    """The median of the per-round ratios of two contenders' windows, or None without two rounds or more. A drift
    of the host between rounds moves both windows of a round alike, so this reads the difference where the ratio
    of two medians may pair a quiet window with a busy one."""
    ratios = _round_ratios(a, b, key)
    return statistics.median(ratios) if ratios else None


#: Rounds a paired ratio needs before it gets a confidence interval (and the target is judged on it).
CI_MIN_ROUNDS = 8
CI_LEVEL = 0.90
_CI_RESAMPLES = 4000


def paired_interval(a: dict[str, Any], b: dict[str, Any], key: str) -> tuple[float, float] | None:
    """A 90% bootstrap interval of :func:`paired_ratio` (percentiles of the median of ``_CI_RESAMPLES`` resamples
    of the per-round ratios, with a fixed seed, so a saved run always reads the same), or None with fewer than
    :data:`CI_MIN_ROUNDS` rounds. On this kind of host one window of the same build moves by up to 2x; the
    interval says what the rounds pin down and what they do not."""
    ratios = _round_ratios(a, b, key)
    if len(ratios) < CI_MIN_ROUNDS:
        return None
    rng = random.Random(20261204)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(_CI_RESAMPLES))
    tail = (1 - CI_LEVEL) / 2
    return medians[int(tail * _CI_RESAMPLES)], medians[int((1 - tail) * _CI_RESAMPLES) - 1]


def verdict(ratio: float | None, interval: tuple[float, float] | None) -> str:
    """The target column: on the paired interval where the row has one ("ok" when all of it is at or under the
    target, "MISS" when all of it is over, "open" when it straddles the target), else on the ratio of the
    medians."""
    if interval is not None:
        low, high = interval
        return "ok" if high <= TARGET_RATIO else "MISS" if low > TARGET_RATIO else "open"
    if ratio is None:
        return ""
    return "ok" if ratio <= TARGET_RATIO else "MISS"


def target_misses(rows: list[dict[str, Any]], verdicts: tuple[str, ...] = ("MISS",)) -> list[str]:
    """The CPU rows of the gateway as shipped whose target column reads one of ``verdicts``."""
    return [r["scenario"] for r in rows if r["is_cpu"] and not r.get("variant") and r["target"] in verdicts]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = ("| scenario | passthrough (1x) | gateway | ratio (gateway/passthrough) | paired (median of rounds' "
            f"ratios; {CI_LEVEL:.0%} interval) | target <= 1.3x |")
    lines = [head, "|---|---:|---:|---:|---:|:---:|"]
    for r in rows:
        lines.append(f"| {r['scenario']} | {r['passthrough']} | {r['gateway']} | {r['ratio']} | {r.get('paired', '')} "
                     f"| {r['target']} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    plan = QUICK if args.quick else FULL
    if args.with_no_obs:
        plan = replace(plan, no_obs=True)
    if shutil.which("wrk") is None:
        print("error: `wrk` is not installed. Install it with:  apt-get install wrk", file=sys.stderr)
        return 2
    if shutil.which("taskset") is None:
        print("error: `taskset` is not installed. Install it with:  apt-get install util-linux", file=sys.stderr)
        return 2
    cpus = os.sched_getaffinity(0)
    if args.proxy_cpu not in cpus or args.load_cpu not in cpus or args.proxy_cpu == args.load_cpu:
        print(f"error: need two distinct usable CPUs for --proxy-cpu/--load-cpu (have {sorted(cpus)})",
              file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {args.load_cpu})  # this driver stays off the proxy's core
    nofile = raise_fd_limit()
    if nofile < 4 * max(sc.concurrency for sc in plan.streams) + 256:
        log(f"warning: open-file limit is {nofile}; the largest stream wave may run out of file descriptors "
            f"(raise it with ulimit -n)")

    started = dt.datetime.now().astimezone()
    t_start = time.monotonic()
    tmp = tempfile.TemporaryDirectory(prefix="ssegate-bench-")
    tmpdir = Path(tmp.name)
    bench = Bench(plan, args, tmpdir)
    keep_logs = False
    result: dict[str, Any] = {"started": started.isoformat(timespec="seconds"), "mode": plan.name,
                              "plan": asdict(plan), "include_usage": args.include_usage,
                              "pinning": {"proxy_under_test": args.proxy_cpu, "mock_and_load": args.load_cpu},
                              "machine": machine_info(), "open_file_limit": nofile,
                              "foreign_threshold_cores": FOREIGN_THRESHOLD, "steal_threshold_cores": STEAL_THRESHOLD}
    log(f"ssegate benchmark ({plan.name}); proxies under test on CPU {args.proxy_cpu} (one loaded at a time), "
        f"mock upstream and load generators on CPU {args.load_cpu}; logs in {tmpdir}")
    all_procs: list[Proc] = []
    try:
        mock_port = free_port()
        bench.mock = Proc("mock_upstream", [sys.executable, "-m", "bench.mock_upstream", "--port", str(mock_port)],
                          args.load_cpu, mock_port, tmpdir)
        all_procs.append(bench.mock.start())
        check_target(f"http://127.0.0.1:{mock_port}", "mock upstream")

        src = None
        if args.ref:
            src = tmpdir / "src"
            result["gateway_source"] = {"ref": args.ref, "commit": export_ref(args.ref, src)}
            log(f"gateway: {args.ref} = commit {result['gateway_source']['commit'][:12]} (exported to {src})")
        else:
            result["gateway_source"] = {"ref": None, "work_tree": str(ROOT)}
        rss_idle: dict[str, int] = {}
        for name in bench.non_stream_names:
            port = free_port()
            env, cwd = None, ROOT
            if name == "passthrough":
                argv = [sys.executable, "-m", "bench.passthrough", "--port", str(port),
                        "--upstream", f"http://127.0.0.1:{mock_port}"]
            else:
                cfg = tmpdir / f"{name}.yaml"
                gateway_config(cfg, port, mock_port)
                argv, env, cwd = gateway_command(cfg, src, NO_OBS_ENV if name == NO_OBS else None)
            proc = Proc(name, argv, args.proxy_cpu, port, tmpdir, env, cwd)
            all_procs.append(proc.start())
            bench.proxies[name] = proc
            check_target(f"http://127.0.0.1:{port}", name)
        time.sleep(0.5)
        for name, proc in bench.proxies.items():
            rss_idle[name] = rss_bytes(proc.pid)

        # Scenarios rotate the order of the proxies, so none always runs first.
        step = 0

        def ordered(names: tuple[str, ...]) -> tuple[str, ...]:
            nonlocal step
            step += 1
            k = step % len(names)
            return names[k:] + names[:k]

        for c in plan.concurrencies:
            log(f"non-stream, concurrency {c}:")
            bench.non_stream(c, ordered)
        if plan.long_body_bytes:
            log(f"non-stream, concurrency {plan.long_concurrency}, a {len(bench.long_body):,}-byte conversation:")
            bench.non_stream(plan.long_concurrency, ordered, long=True)
        for sc in plan.streams:
            log(f"{sc.label}:")
            bench.streams(sc, ordered)
        log(f"TTFT, C=1, {plan.ttft_delay_ms:.0f} ms/chunk, {plan.ttft_rounds} interleaved rounds:")
        ttft = bench.ttft()

        rows = build_rows(plan, bench.results, ttft, rss_idle)
        result.update(
            duration_s=time.monotonic() - t_start,
            results={"direct": {"ttft": ttft["direct"]},
                     **{n: {**bench.results[n], "ttft": ttft[n], "rss_idle": rss_idle[n]} for n in PROXIES},
                     **({NO_OBS: {**bench.results[NO_OBS], "rss_idle": rss_idle[NO_OBS]}} if plan.no_obs else {})},
            table=rows,
        )
        failures = next(r for r in rows if r["scenario"].startswith("failures"))
        result["failures"] = {"passthrough": int(failures["passthrough"]), "gateway": int(failures["gateway"])}
        misses = target_misses(rows)
        undecided = target_misses(rows, ("open",))
        noisy = [r["scenario"] for r in rows if "†" in r["passthrough"] + r["gateway"]]
        result["target"] = {"max_ratio": TARGET_RATIO, "misses": misses, "open": undecided}
        result["noisy_rows"] = noisy
        print()
        print(f"## ssegate benchmark, {plan.name} mode, {started:%Y-%m-%d %H:%M %Z} ({result['duration_s']:.0f} s)")
        print()
        src_note = (f"gateway at {args.ref} ({result['gateway_source']['commit'][:12]})" if args.ref
                    else f"gateway from the work tree (git {result['machine']['git_commit']}"
                         f"{', uncommitted changes in proxy/ or plugins/' if result['machine']['proxy_tree_dirty'] else ''})")
        print(f"{result['machine']['cpus']} CPUs ({result['machine']['cpu_model']}), Python "
              f"{result['machine']['python']}, aiohttp {result['machine']['aiohttp']}, uvloop "
              f"{result['machine']['uvloop']}; {src_note}.")
        print()
        print(markdown_table(rows))
        print()
        print(f"Proxy under test pinned to CPU {args.proxy_cpu}; mock upstream, wrk and the stream client on CPU "
              f"{args.load_cpu}. Target: gateway CPU <= {TARGET_RATIO}x the bare passthrough's.")
        if noisy:
            print(f"† measured while other processes used more than {FOREIGN_THRESHOLD} core, or the hypervisor "
                  f"stole more than {STEAL_THRESHOLD} core from this VM (retries exhausted): treat with care.")
        if plan.no_obs:
            print("Rows \"gateway without access line and metrics\": the same gateway with "
                  "observability.access_log and observability.metrics off, for what the two cost; the target is "
                  "judged on the gateway as shipped.")
        print(f"Target column: rows with {CI_MIN_ROUNDS} rounds or more are judged on the {CI_LEVEL:.0%} bootstrap "
              "interval of the paired ratio (ok: all of it at or under the target; MISS: all of it over; open: it "
              "straddles the target); the others on the ratio of the medians.")
        shipped = sum(1 for r in rows if r["is_cpu"] and not r.get("variant"))
        if misses:
            print(f"Target missed in {len(misses)} of {shipped} CPU scenarios.")
        if undecided:
            print(f"Not decided by this run in {len(undecided)} of {shipped} CPU scenarios: {', '.join(undecided)}.")
        bad = result["failures"]["passthrough"] + result["failures"]["gateway"]
        if bad:
            keep_logs = True
            print(f"\n!!! FAILURES: {result['failures']} -- see the log above", file=sys.stderr)
        return 1 if bad else 0
    except BaseException as exc:
        keep_logs = True
        result["error"] = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, Exception):
            log(f"\n!!! benchmark aborted: {result['error']}")
            for p in all_procs:
                log(f"--- {p.name} log tail ---\n{p.log_tail()}")
            return 1
        raise
    finally:
        for p in reversed(all_procs):
            p.stop()
        RESULTS_DIR.mkdir(exist_ok=True)
        out = RESULTS_DIR / f"{started:%Y%m%d-%H%M%S}{'-quick' if args.quick else ''}.json"
        out.write_text(json.dumps(result, indent=2, default=str))
        log(f"results written to {out.relative_to(ROOT)}")
        if keep_logs:
            keep = RESULTS_DIR / f"{started:%Y%m%d-%H%M%S}-logs"
            shutil.copytree(tmpdir, keep, dirs_exist_ok=True, ignore=shutil.ignore_patterns("src"))
            log(f"process logs kept in {keep.relative_to(ROOT)}")
        tmp.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=(
        "Measure the ssegate gateway against a bare aiohttp passthrough (1x) and a direct connection."))
    parser.add_argument("--quick", action="store_true", help="short smoke run (< 2 minutes)")
    parser.add_argument("--ref", default=None, help=(
        "benchmark the gateway of this git ref (e.g. HEAD), exported to a temporary directory, instead of the "
        "work tree; useful while the work tree is being edited"))
    parser.add_argument("--proxy-cpu", type=int, default=0, help="CPU for the proxies under test (default 0)")
    parser.add_argument("--load-cpu", type=int, default=1, help="CPU for the mock upstream and the load (default 1)")
    parser.add_argument("--no-include-usage", dest="include_usage", action="store_false",
                        help="streams do not ask for stream_options.include_usage (the gateway then asks "
                             "upstream anyway and strips the usage chunk)")
    parser.add_argument("--with-no-obs", action="store_true",
                        help="also measure the gateway without its access line and metrics in the non-stream rows "
                             "(a third contender: what the two cost)")
    args = parser.parse_args(argv)

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("\ninterrupted; child processes stopped", file=sys.stderr)
        return 130
