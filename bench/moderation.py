"""CPU cost of the ``moderation`` plugin's output scanning, per 64-chunk stream: ``python -m bench.moderation``.

Two measurements, both with moderation on and off:

1. **in-process**: the pipeline's ``on_chunk`` chain (built by ``proxy.pipeline.Pipeline`` exactly as the relay
   uses it) driven over a realistic OpenAI stream — a role chunk, 64 content chunks of English prose (2-8
   characters each, as model tokens are), a finish chunk, a usage chunk, ``[DONE]`` — with ``Chunk`` objects
   built per event as the relay builds them. CPU time (``time.process_time``) per stream, best of several
   rounds. This isolates the plugin: no sockets, no event loop.
2. **gateway**: a real ``ssegate serve`` process (pinned to core 0 when there are two cores) in front of the
   benchmark's mock upstream (``bench/mock_upstream.py``, core 1); this process drives sequential streams
   (C=1) and 16 concurrent ones (C=16) and reads the gateway's utime+stime from ``/proc`` around each measured
   phase (after a warm-up). The variants' phases alternate, best of three. Ratio = gateway CPU per stream with
   the plugin / without. A variant with a no-op ``on_chunk`` plugin shows what the hook chain itself costs.

Moderation runs with the shipped example rules (``conf/moderation/example.yaml``: keywords and regular
expressions for output) and the built-in jailbreak patterns (input only), with the default hold-back window
and with ``holdback_chars: 0``. Nothing in the benchmark stream is flagged: this is the cost every clean
answer pays.

    python -m bench.moderation                 # both measurements
    python -m bench.moderation --quick         # fewer streams
    python -m bench.moderation --no-gateway    # in-process only
    python -m bench.moderation --json out.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.procstat import cpu_seconds  # noqa: E402
from proxy import hookimpl  # noqa: E402

RULES = str(ROOT / "conf" / "moderation" / "example.yaml")
CONTENT_CHUNKS = 64
_PROSE = ("The quick answer is that streaming gateways should forward each token as soon as it arrives, "
          "without buffering the response, while still checking the text for policy violations across "
          "chunk boundaries. A small window of recent characters is enough for that, because every rule "
          "has a known maximum length, so the scanner only looks at the new text and a short overlap.")


def prose_tokens(n: int = CONTENT_CHUNKS) -> list[str]:
    """n token-like pieces of English text (2-8 characters, leading spaces as tokenizers make them)."""
    words = _PROSE.split(" ")
    out: list[str] = []
    i = 0
    while len(out) < n:
        word = words[i % len(words)]
        piece = (" " if i else "") + word
        while len(piece) > 8 and len(out) < n - 1:
            out.append(piece[:6])
            piece = piece[6:]
        out.append(piece)
        i += 1
    return out[:n]


def stream_events(include_usage: bool = True) -> list[bytes]:
    base = {"id": "chatcmpl-bench0000000000000000000000", "object": "chat.completion.chunk", "created": 1700000000,
            "model": "bench-model", "system_fingerprint": "fp_bench"}
    extra = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
        return b"data: " + orjson.dumps({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                              "finish_reason": finish}], **extra})

    events = [chunk({"role": "assistant", "content": ""}, None)]
    events += [chunk({"content": t}, None) for t in prose_tokens()]
    events.append(chunk({}, "stop"))
    if include_usage:
        events.append(b"data: " + orjson.dumps({**base, "choices": [], "usage": {
            "prompt_tokens": 12, "completion_tokens": CONTENT_CHUNKS, "total_tokens": 12 + CONTENT_CHUNKS}}))
    events.append(b"data: [DONE]")
    return events


# -- 1. in-process ----------------------------------------------------------------------------------------------

class _Noop:
    """A plugin whose on_chunk does nothing: the cost of the chain itself."""

    @hookimpl
    def on_chunk(self, exchange: Any, chunk: Any) -> None:
        return None


def _chain(entries: list[Any]) -> Any:
    from proxy.config.schema import PipelineEntry
    from proxy.pipeline import Pipeline
    from proxy.plugin_manager import load_plugins, new_plugin_manager

    pm = new_plugin_manager()
    objects = {"noop": _Noop()}
    loaded = load_plugins(tuple(e if isinstance(e, PipelineEntry) else PipelineEntry(e) for e in entries), pm,
                          objects=objects)
    return Pipeline(pm, [p.name for p in loaded]).on_chunk


def in_process(streams: int, rounds: int) -> dict[str, Any]:
    from proxy import Exchange
    from proxy.config.schema import PipelineEntry
    from proxy.sse import Chunk

    events = stream_events()
    moderation = {"rule_files": [RULES], "jailbreak_detection": True}
    variants: dict[str, Any] = {
        "no on_chunk plugin": None,
        "no-op on_chunk plugin": _chain(["noop"]),
        "moderation (default hold-back)": _chain([PipelineEntry("moderation", moderation)]),
        "moderation (holdback_chars: 0)": _chain([PipelineEntry("moderation", {**moderation, "holdback_chars": 0})]),
        "cache (not recording) + moderation": _chain([PipelineEntry("cache", {}),
                                                      PipelineEntry("moderation", moderation)]),
    }
    out: dict[str, Any] = {}
    for name, chain in variants.items():
        # sanity: everything is released, in order, unchanged
        if chain is not None:
            ex = Exchange(request_id="b", endpoint="chat.completions")
            got = [c.raw for ev in events for c in chain(ex, Chunk(ev))]
            assert got == events, f"{name}: the chain changed the stream"
        samples = []
        for _ in range(rounds):
            t0 = time.process_time()
            for _ in range(streams):
                ex = Exchange(request_id="b", endpoint="chat.completions")
                if chain is None:
                    batch = [ev for ev in events]
                else:
                    batch = []
                    for ev in events:
                        for c in chain(ex, Chunk(ev)):
                            batch.append(c.raw)
            samples.append((time.process_time() - t0) / streams * 1e6)
        out[name] = {"us_per_stream": min(samples), "us_per_stream_median": statistics.median(samples)}
    base = out["no on_chunk plugin"]["us_per_stream"]
    for name, r in out.items():
        r["added_us_per_stream"] = r["us_per_stream"] - base
        r["added_us_per_chunk"] = (r["us_per_stream"] - base) / len(events)
    return out


# -- 2. through a real gateway ---------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pinned(argv: list[str], cpu: int | None) -> list[str]:
    if cpu is not None and shutil.which("taskset"):
        return ["taskset", "-c", str(cpu), *argv]
    return argv


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


def _gateway_yaml(port: int, upstream_port: int, plugins: list[Any]) -> str:
    import attrs

    from proxy.config.schema import Config

    pipeline: list[Any] = [*plugins, "router"]
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port},
        "logging": {"level": "warning"},
        "providers": [{"name": "mock", "type": "openai", "base_url": f"http://127.0.0.1:{upstream_port}/v1",
                       "models": ["*"], "max_connections": 256, "max_keepalive_connections": 256}],
        "pipeline": pipeline,
    }
    if "observability" in attrs.fields_dict(Config):  # measure the plugin, not the access log and metrics
        data["observability"] = {"metrics": False, "access_log": False}
    return json.dumps(data)  # JSON is YAML


async def _drive(url: str, count: int, concurrency: int) -> int:
    import aiohttp

    body = orjson.dumps({"model": "bench-model", "stream": True,
                         "messages": [{"role": "user", "content": "Say something long."}]})
    done = 0
    queue = list(range(count))

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal done
        while queue:
            queue.pop()
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
                raw = await resp.read()
            if resp.status == 200 and raw.count(b'"delta":{"content":') == CONTENT_CHUNKS \
                    and raw.rstrip().endswith(b"data: [DONE]"):
                done += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return done


def gateway(streams: int, warmup: int, reps: int) -> dict[str, Any]:
    """Every variant's gateway runs at once (idle ones cost nothing); phases alternate between them ``reps``
    times and each keeps its lowest CPU per stream, so a load change on the machine does not favour one."""
    two_cores = (os.cpu_count() or 1) >= 2
    gw_cpu, load_cpu = (0, 1) if two_cores else (None, None)
    if load_cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {load_cpu})
    procs: list[subprocess.Popen[bytes]] = []
    tmp = Path(tempfile.mkdtemp(prefix="ssegate-bench-mod-"))
    try:
        mock = subprocess.Popen(_pinned([sys.executable, "-m", "bench.mock_upstream", "--port", "0"], load_cpu),
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        procs.append(mock)
        assert mock.stdout is not None
        line = mock.stdout.readline().decode()
        if not line.startswith("READY"):
            raise RuntimeError(f"mock upstream did not start: {line!r}")
        upstream_port = int(line.split()[1])
        variants: dict[str, list[Any]] = {
            "off": [],
            "no-op on_chunk plugin (the chain's own cost)": ["bench.moderation:_Noop"],
            "on (default hold-back)": [{"moderation": {"rule_files": [RULES]}}],
            "on (holdback_chars: 0)": [{"moderation": {"rule_files": [RULES], "holdback_chars": 0}}],
        }
        gateways: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
        env = {k: v for k, v in os.environ.items() if not k.startswith("SSEGATE_")}
        for name, plugins in variants.items():
            port = _free_port()
            cfg = tmp / f"gw-{port}.yaml"
            cfg.write_text(_gateway_yaml(port, upstream_port, plugins))
            proc = subprocess.Popen(_pinned([sys.executable, "-m", "proxy", "serve", "--config", str(cfg)], gw_cpu),
                                    cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(proc)
            _wait_port(port, proc)
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            gateways[name] = (proc, url)
            for concurrency in (1, 16):
                asyncio.run(_drive(url, warmup, concurrency))
        results: dict[str, dict[str, Any]] = {name: {} for name in variants}
        for _ in range(reps):
            for concurrency in (1, 16):
                for name, (proc, url) in gateways.items():
                    cpu0 = cpu_seconds(proc.pid)
                    ok = asyncio.run(_drive(url, streams, concurrency))
                    cpu = cpu_seconds(proc.pid) - cpu0
                    if ok != streams:
                        raise RuntimeError(f"{name}: only {ok}/{streams} streams were complete")
                    key = f"c{concurrency}_ms_per_stream"
                    value = cpu / streams * 1000
                    results[name][key] = min(value, results[name].get(key, value))
        off = results["off"]
        for row in results.values():
            for c in (1, 16):
                row[f"c{c}_ratio"] = row[f"c{c}_ms_per_stream"] / off[f"c{c}_ms_per_stream"]
                row[f"c{c}_added_ms"] = row[f"c{c}_ms_per_stream"] - off[f"c{c}_ms_per_stream"]
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)
    return results


# -- report ---------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer streams (a smoke run)")
    parser.add_argument("--no-gateway", action="store_true", help="skip the measurement through a real gateway")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    in_streams, rounds = (500, 3) if args.quick else (3000, 7)
    gw_streams, warmup, reps = (200, 50, 1) if args.quick else (1000, 200, 3)
    report: dict[str, Any] = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                          "platform": platform.platform()},
                              "stream": {"events": len(stream_events()), "content_chunks": CONTENT_CHUNKS,
                                         "rules": "conf/moderation/example.yaml + jailbreak patterns"}}
    print(f"in-process on_chunk chain, {in_streams} streams x {rounds} rounds "
          f"({len(stream_events())} events per stream, {CONTENT_CHUNKS} content chunks)", file=sys.stderr)
    report["in_process"] = in_process(in_streams, rounds)
    print("\n| on_chunk chain (in-process) | CPU µs / stream | added µs / stream | added µs / event |")
    print("|---|---:|---:|---:|")
    for name, r in report["in_process"].items():
        print(f"| {name} | {r['us_per_stream']:.1f} | {r['added_us_per_stream']:.1f} | "
              f"{r['added_us_per_chunk']:.2f} |")
    if not args.no_gateway:
        print(f"\nthrough a real gateway: {gw_streams} streams per phase after {warmup} warm-up, best of {reps}",
              file=sys.stderr)
        report["gateway"] = gateway(gw_streams, warmup, reps)
        print("\n| gateway, moderation | CPU ms / stream, C=1 | ratio | CPU ms / stream, C=16 | ratio |")
        print("|---|---:|---:|---:|---:|")
        for name, r in report["gateway"].items():
            print(f"| {name} | {r['c1_ms_per_stream']:.3f} | {r['c1_ratio']:.2f}× | "
                  f"{r['c16_ms_per_stream']:.3f} | {r['c16_ratio']:.2f}× |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
