"""Tests of the simulator engine (proxy.simulator) and its HTTP server (proxy.simulator_server)."""
from __future__ import annotations

import asyncio
import base64
import logging
import math
import os
import queue
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import openai
import orjson
import pytest

from proxy.config.schema import SimulationConfig
from proxy.errors import GatewayError
from proxy.simulator import Simulator, estimate_message_tokens
from proxy.simulator_server import SIMULATOR_KEY, STATS_KEY, build_simulator_app
from proxy.sse import DONE, SSEParser

REPO = Path(__file__).resolve().parents[1]
FAST = SimulationConfig(ttft_ms=0, itl_ms=0)
MSGS = [{"role": "user", "content": "Tell me something."}]


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": MSGS, **extra}


async def collect(agen: Any) -> list[bytes]:
    return [event async for event in agen]


def payloads(events: list[bytes]) -> list[dict[str, Any]]:
    """JSON payloads of raw events (all but the final [DONE])."""
    assert events[-1] == DONE
    out = []
    for event in events[:-1]:
        assert event.startswith(b"data: ") and b"\n" not in event
        out.append(orjson.loads(event[6:]))
    return out


def stream_text(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


# ------------------------------------------------------------------------------------------------- the engine


async def test_chat_stream_shape_matches_openai() -> None:
    sim = Simulator(FAST)
    chunks = payloads(await collect(sim.chat_stream(chat_body(max_tokens=5))))
    assert len(chunks) == 1 + 5 + 1
    first, tokens, last = chunks[0], chunks[1:-1], chunks[-1]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["choices"][0]["finish_reason"] is None
    for c in tokens:
        assert set(c["choices"][0]["delta"]) == {"content"}
        assert c["choices"][0]["delta"]["content"]
        assert c["choices"][0]["finish_reason"] is None
    assert last["choices"][0]["delta"] == {}
    assert last["choices"][0]["finish_reason"] == "length"
    assert {c["id"] for c in chunks} == {first["id"]}
    assert {c["created"] for c in chunks} == {first["created"]}
    assert {c["model"] for c in chunks} == {"gpt-4o-mini"}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert first["id"].startswith("chatcmpl-") and len(first["id"]) == len("chatcmpl-") + 24
    assert all("usage" not in c for c in chunks)
    text = stream_text(chunks)
    assert text[0].isupper() and not text.startswith(" ")


async def test_chat_stream_usage_chunk_only_with_include_usage() -> None:
    sim = Simulator(FAST)
    body = chat_body(max_tokens=4, stream_options={"include_usage": True})
    chunks = payloads(await collect(sim.chat_stream(body)))
    *others, usage_chunk = chunks
    assert usage_chunk["choices"] == []
    prompt = estimate_message_tokens(MSGS)
    assert usage_chunk["usage"] == {"prompt_tokens": prompt, "completion_tokens": 4, "total_tokens": prompt + 4}
    assert all("usage" in c and c["usage"] is None for c in others)
    assert others[-1]["choices"][0]["finish_reason"] == "length"
    off = payloads(await collect(sim.chat_stream(chat_body(stream_options={"include_usage": False}))))
    assert all("usage" not in c and c["choices"] for c in off)


async def test_non_stream_chat_completion_object() -> None:
    sim = Simulator(FAST)
    result = await sim.chat_completion(chat_body(model="gpt-4o"))
    assert result["object"] == "chat.completion"
    assert result["model"] == "gpt-4o"
    assert result["id"].startswith("chatcmpl-")
    assert result["system_fingerprint"].startswith("fp_")
    choice = result["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["refusal"] is None
    assert choice["finish_reason"] == "stop"
    assert result["usage"]["completion_tokens"] == FAST.response_tokens
    assert result["usage"]["total_tokens"] == result["usage"]["prompt_tokens"] + FAST.response_tokens
    assert choice["message"]["content"].endswith(".")  # a natural stop ends a sentence


async def test_seed_makes_text_deterministic_and_stream_equals_non_stream() -> None:
    sim = Simulator(FAST)
    a = await sim.chat_completion(chat_body(seed=7, max_tokens=20))
    b = await sim.chat_completion(chat_body(seed=7, max_tokens=20))
    streamed = stream_text(payloads(await collect(sim.chat_stream(chat_body(seed=7, max_tokens=20)))))
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"] == streamed
    texts = {(await sim.chat_completion(chat_body(seed=s)))["choices"][0]["message"]["content"] for s in range(8)}
    assert len(texts) > 1
    # The configured seed applies when the request has none, across Simulator instances.
    one = await Simulator(SimulationConfig(ttft_ms=0, itl_ms=0, seed=3)).chat_completion(chat_body())
    two = await Simulator(SimulationConfig(ttft_ms=0, itl_ms=0, seed=3)).chat_completion(chat_body())
    assert one["choices"][0]["message"]["content"] == two["choices"][0]["message"]["content"]


async def test_max_tokens_and_max_completion_tokens_set_length() -> None:
    sim = Simulator(SimulationConfig(ttft_ms=0, itl_ms=0, response_tokens=9))
    default = payloads(await collect(sim.chat_stream(chat_body())))
    assert len(default) - 2 == 9 and default[-1]["choices"][0]["finish_reason"] == "stop"
    r = await sim.chat_completion(chat_body(max_completion_tokens=3, max_tokens=50))
    assert r["usage"]["completion_tokens"] == 3 and r["choices"][0]["finish_reason"] == "length"
    long = await sim.chat_completion(chat_body(max_tokens=20000, seed=1))  # longer than the corpus: wraps
    assert long["usage"]["completion_tokens"] == 20000
    assert len(long["choices"][0]["message"]["content"].split(" ")) == 20000
    with pytest.raises(GatewayError) as err:
        await sim.chat_completion(chat_body(max_tokens=0))
    assert err.value.status == 400 and err.value.param == "max_tokens"


def test_prompt_token_estimate_handles_strings_and_parts() -> None:
    assert estimate_message_tokens([{"role": "user", "content": "x" * 40}]) == 10
    assert estimate_message_tokens([{"role": "user", "content": ""}, {"role": "assistant", "content": None}]) == 2
    parts = [{"type": "text", "text": "a" * 8}, {"type": "text", "text": "b" * 8}]
    assert estimate_message_tokens([{"role": "user", "content": parts}]) == 4
    with_image = parts + [{"type": "image_url", "image_url": {"url": "data:,"}}]
    assert estimate_message_tokens([{"role": "user", "content": with_image}]) > 4


def test_check_model_and_body() -> None:
    sim = Simulator(FAST)
    sim.check(chat_body(), "chat")
    with pytest.raises(GatewayError) as err:
        sim.check(chat_body(model="nope"), "chat")
    assert (err.value.status, err.value.code, err.value.param) == (404, "model_not_found", "model")
    assert err.value.to_dict()["error"]["type"] == "invalid_request_error"
    with pytest.raises(GatewayError) as err:
        sim.check({"model": "gpt-4o"}, "/v1/chat/completions")
    assert (err.value.status, err.value.param) == (400, "messages")
    with pytest.raises(GatewayError) as err:
        sim.check({"model": "gpt-4o"}, "completions")
    assert err.value.param == "prompt"
    any_model = Simulator(SimulationConfig(models=("*",)))
    any_model.check(chat_body(model="whatever-model"), "chat")
    assert any_model.models() == []


def test_check_injects_errors() -> None:
    sim = Simulator(SimulationConfig(error_rate=1.0, error_status=429))
    with pytest.raises(GatewayError) as err:
        sim.check(chat_body(), "chat")
    e = err.value
    assert (e.status, e.code, e.type) == (429, "simulated_error", "rate_limit_error")
    assert e.headers == {"Retry-After": "1"}
    assert e.message == "Simulated upstream error"
    sim500 = Simulator(SimulationConfig(error_rate=1.0, error_status=503))
    with pytest.raises(GatewayError) as err:
        sim500.check(chat_body(), "chat")
    assert err.value.status == 503 and "Retry-After" not in err.value.headers
    never = Simulator(SimulationConfig(error_rate=0.0))
    for _ in range(200):
        never.check(chat_body(), "chat")
    half = Simulator(SimulationConfig(error_rate=0.5, seed=1))
    failures = 0
    for _ in range(400):
        try:
            half.check(chat_body(), "chat")
        except GatewayError:
            failures += 1
    assert 120 < failures < 280


def test_models_list() -> None:
    sim = Simulator(SimulationConfig(models=("m1", "m2", "m2", "gpt-4*")))
    models = sim.models()
    assert [m["id"] for m in models] == ["m1", "m2"]
    assert all(m["object"] == "model" and m["owned_by"] == "ssegate-simulator" for m in models)
    assert all(isinstance(m["created"], int) for m in models)
    sim.check(chat_body(model="gpt-4-turbo"), "chat")  # wildcard entries are served, not listed


async def test_completion_legacy_objects() -> None:
    sim = Simulator(FAST)
    result = await sim.completion({"model": "gpt-3.5-turbo", "prompt": "x" * 12, "max_tokens": 6, "seed": 5})
    assert result["object"] == "text_completion" and result["id"].startswith("cmpl-")
    assert result["choices"][0]["finish_reason"] == "length"
    assert result["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    body = {"model": "gpt-3.5-turbo", "prompt": ["a", [1, 2, 3]], "max_tokens": 6, "seed": 5, "stream": True,
            "stream_options": {"include_usage": True}}
    chunks = payloads(await collect(sim.completion_stream(body)))
    assert {c["object"] for c in chunks} == {"text_completion"}
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == result["choices"][0]["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-2]["choices"][0]["text"] == ""
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 1 + 3


def test_embeddings_deterministic_unit_vectors() -> None:
    sim = Simulator(FAST)
    r = sim.embeddings({"model": "text-embedding-3-small", "input": ["hello", "world", "hello"]})
    vectors = [d["embedding"] for d in r["data"]]
    assert [d["index"] for d in r["data"]] == [0, 1, 2] and r["object"] == "list"
    assert all(len(v) == 1536 for v in vectors)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1.0) < 1e-4 for v in vectors)
    assert vectors[0] == vectors[2] and vectors[0] != vectors[1]
    assert r["usage"] == {"prompt_tokens": 2 + 2 + 2, "total_tokens": 6}  # ~4 characters per token
    small = sim.embeddings({"model": "m", "input": "hello", "dimensions": 8})["data"][0]["embedding"]
    assert len(small) == 8
    b64 = sim.embeddings({"model": "m", "input": "hello", "dimensions": 8, "encoding_format": "base64"})
    decoded = list(struct.unpack("<8f", base64.b64decode(b64["data"][0]["embedding"])))
    assert decoded == small
    tokens = sim.embeddings({"model": "m", "input": [[1, 2, 3], [4]], "dimensions": 4})
    assert len(tokens["data"]) == 2 and tokens["usage"]["prompt_tokens"] == 4
    assert sim.embeddings({"model": "m", "input": [1, 2, 3], "dimensions": 4})["data"][0]["embedding"] == (
        tokens["data"][0]["embedding"]
    )
    for bad in ({"input": ""}, {"input": []}, {"input": [None]}, {"input": "x", "dimensions": 0},
                {"input": "x", "encoding_format": "hex"}):
        with pytest.raises(GatewayError) as err:
            sim.embeddings({"model": "m", **bad})
        assert err.value.status == 400


async def test_zero_delay_never_sleeps_and_delays_sleep_once_per_token(monkeypatch: pytest.MonkeyPatch) -> None:
    import proxy.simulator as simulator_module

    calls: list[float] = []
    real_sleep = asyncio.sleep

    async def counting_sleep(delay: float, *args: Any) -> Any:
        calls.append(delay)
        return await real_sleep(0)

    monkeypatch.setattr(simulator_module.asyncio, "sleep", counting_sleep)
    await collect(Simulator(FAST).chat_stream(chat_body(max_tokens=10)))
    await Simulator(FAST).chat_completion(chat_body(max_tokens=10))
    assert calls == []
    await collect(Simulator(SimulationConfig(ttft_ms=5, itl_ms=1)).chat_stream(chat_body(max_tokens=10)))
    assert 1 <= len(calls) <= 10 and all(d > 0 for d in calls)


async def test_stream_pacing_honours_ttft_and_itl() -> None:
    sim = Simulator(SimulationConfig(ttft_ms=60, ttft_variance_percent=0, itl_ms=10, itl_variance_percent=0))
    start = time.perf_counter()
    stamps, events = [], []
    async for event in sim.chat_stream(chat_body(max_tokens=6)):
        stamps.append(time.perf_counter() - start)
        events.append(event)
    assert b'"role":"assistant"' in events[0] and b'"content":""' in events[0]  # the role chunk leads
    assert stamps[1] >= 0.06 - 0.002  # first content token not before TTFT
    assert stamps[6] >= 0.06 + 5 * 0.010 - 0.002  # then one ITL per token
    start = time.perf_counter()
    await sim.chat_completion(chat_body(max_tokens=6))
    assert time.perf_counter() - start >= 0.06 + 5 * 0.010 - 0.002


# ------------------------------------------------------------------------------------------ the aiohttp app


async def test_http_basic_routes_and_errors(aiohttp_client: Any) -> None:
    client = await aiohttp_client(build_simulator_app(FAST))
    resp = await client.get("/health")
    assert resp.status == 200 and await resp.json() == {"status": "healthy"}
    resp = await client.get("/v1/models")
    data = await resp.json()
    assert data["object"] == "list" and "gpt-4o-mini" in [m["id"] for m in data["data"]]
    resp = await client.get("/v1/models/gpt-4o")
    assert (await resp.json())["id"] == "gpt-4o"
    resp = await client.post("/v1/chat/completions", data=b"{not json", headers={"Content-Type": "application/json"})
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert err["type"] == "invalid_request_error" and set(err) == {"message", "type", "param", "code"}
    resp = await client.post("/v1/chat/completions", data=b"[1, 2]")
    assert resp.status == 400
    resp = await client.post("/v1/chat/completions", json=chat_body(model="unknown-model"))
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "model_not_found"
    resp = await client.post("/v1/chat/completions", json={"model": "gpt-4o"})
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "messages"
    resp = await client.get("/v1/nothing-here")
    assert resp.status == 404 and "error" in await resp.json()
    resp = await client.get("/v1/chat/completions")
    assert resp.status == 405 and "error" in await resp.json()


async def test_http_stream_framing_and_headers(aiohttp_client: Any) -> None:
    client = await aiohttp_client(build_simulator_app(FAST))
    resp = await client.post("/v1/chat/completions", json=chat_body(stream=True, max_tokens=3, seed=2))
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["Cache-Control"] == "no-cache"
    raw = await resp.read()
    assert raw.endswith(b"data: [DONE]\n\n")
    events = SSEParser().feed(raw)
    assert len(events) == 1 + 3 + 1 + 1
    resp = await client.post("/v1/chat/completions", json=chat_body(max_tokens=3, seed=2))
    content = (await resp.json())["choices"][0]["message"]["content"]
    assert stream_text(payloads(events)) == content
    resp = await client.post("/v1/completions", json={"model": "gpt-4o", "prompt": "hi", "stream": True})
    assert resp.status == 200 and (await resp.read()).endswith(b"data: [DONE]\n\n")
    resp = await client.post("/v1/embeddings", json={"model": "gpt-4o", "input": "hi", "dimensions": 3})
    assert len((await resp.json())["data"][0]["embedding"]) == 3


async def test_http_stream_validation_error_comes_as_status(aiohttp_client: Any) -> None:
    client = await aiohttp_client(build_simulator_app(FAST))
    resp = await client.post("/v1/chat/completions", json=chat_body(stream=True, max_tokens="many"))
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "max_tokens"


async def test_http_injected_429_has_retry_after(aiohttp_client: Any) -> None:
    client = await aiohttp_client(build_simulator_app(SimulationConfig(error_rate=1.0, error_status=429)))
    resp = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "1"
    error = (await resp.json())["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "simulated_error")


async def test_http_client_disconnect_stops_generator(aiohttp_client: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    app = build_simulator_app(SimulationConfig(ttft_ms=1, itl_ms=5))
    sim = app[SIMULATOR_KEY]
    closed = asyncio.Event()
    produced = 0
    original = sim.chat_stream

    async def tracking_stream(body: dict[str, Any]) -> Any:
        nonlocal produced
        try:
            async for event in original(body):
                produced += 1
                yield event
        finally:
            closed.set()

    sim.chat_stream = tracking_stream  # type: ignore[method-assign]
    client = await aiohttp_client(app)
    resp = await client.post("/v1/chat/completions", json=chat_body(stream=True, max_tokens=100000))
    events = 0
    while events < 3:
        line = await resp.content.readline()
        if line.strip():
            assert line.startswith(b"data: ")
            events += 1
    resp.close()
    await asyncio.wait_for(closed.wait(), timeout=5)
    await asyncio.sleep(0.05)
    assert 3 <= produced < 100000  # stopped long before the end of the answer
    assert app[STATS_KEY].active_streams == 0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


async def test_http_ttft_is_honoured(aiohttp_client: Any) -> None:
    config = SimulationConfig(ttft_ms=150, ttft_variance_percent=0, itl_ms=1)
    client = await aiohttp_client(build_simulator_app(config))
    start = time.perf_counter()
    resp = await client.post("/v1/chat/completions", json=chat_body(stream=True, max_tokens=2))
    first_content = None
    async for line in resp.content:
        if b'"content":"' in line and b'"role"' not in line:
            first_content = time.perf_counter() - start
            break
    assert first_content is not None and first_content >= 0.150
    await resp.read()


# ------------------------------------------------------------------------------ a real subprocess + openai SDK


def _spawn(config_args: str = "ttft_ms=1, itl_ms=1") -> tuple[subprocess.Popen[str], int, Any]:
    code = (
        "import asyncio; from proxy.simulator_server import run_simulator; "
        "from proxy.config.schema import SimulationConfig; "
        f"asyncio.run(run_simulator('127.0.0.1', 0, SimulationConfig({config_args})))"
    )
    stderr = tempfile.TemporaryFile(mode="w+")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True
    )
    lines: queue.Queue[str] = queue.Queue()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=reader, daemon=True).start()
    deadline = time.monotonic() + 30
    prefix = "ssegate simulator listening on http://127.0.0.1:"
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            _stop(proc)
            stderr.seek(0)
            raise RuntimeError(f"simulator did not start: {stderr.read()}") from None
        if line.startswith(prefix):
            return proc, int(line[len(prefix):].strip()), stderr


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def sim_port() -> Iterator[int]:
    proc, port, stderr = _spawn()
    try:
        yield port
    finally:
        _stop(proc)
        stderr.close()


@pytest.fixture
def spawn() -> Iterator[Any]:
    procs: list[tuple[subprocess.Popen[str], Any]] = []

    def start(config_args: str) -> int:
        proc, port, stderr = _spawn(config_args)
        procs.append((proc, stderr))
        return port

    yield start
    for proc, stderr in procs:
        _stop(proc)
        stderr.close()


def sdk(port: int) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=20)


async def test_sdk_streaming_chat_matches_non_stream(sim_port: int) -> None:
    async with sdk(sim_port) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=MSGS, stream=True, seed=42, max_tokens=12,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        full = await client.chat.completions.create(model="gpt-4o-mini", messages=MSGS, seed=42, max_tokens=12)
        plain = await client.chat.completions.create(model="gpt-4o-mini", messages=MSGS, stream=True, seed=42,
                                                     max_tokens=12)
        plain_chunks = [chunk async for chunk in plain]
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content and content == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1] and chunks[-1].choices == []
    assert usage_chunks[0].usage.completion_tokens == 12
    assert all(c.usage is None for c in plain_chunks) and all(c.choices for c in plain_chunks)
    assert len({c.id for c in chunks}) == 1


async def test_sdk_non_stream_chat_usage(sim_port: int) -> None:
    async with sdk(sim_port) as client:
        messages = [{"role": "system", "content": "s" * 40}, {"role": "user", "content": "u" * 20}]
        result = await client.chat.completions.create(model="gpt-4o", messages=messages)
    assert result.object == "chat.completion" and result.model == "gpt-4o"
    assert result.choices[0].finish_reason == "stop"
    assert result.usage.prompt_tokens == 10 + 5
    assert result.usage.completion_tokens == 32
    assert result.usage.total_tokens == 47
    assert result.system_fingerprint and result.id.startswith("chatcmpl-")


async def test_sdk_completions(sim_port: int) -> None:
    async with sdk(sim_port) as client:
        result = await client.completions.create(model="gpt-3.5-turbo", prompt="Once upon", max_tokens=7, seed=9)
        stream = await client.completions.create(model="gpt-3.5-turbo", prompt="Once upon", max_tokens=7, seed=9,
                                                 stream=True)
        text = "".join([c.choices[0].text async for c in stream])
    assert result.object == "text_completion"
    assert result.usage.completion_tokens == 7 and result.choices[0].finish_reason == "length"
    assert text == result.choices[0].text and len(text.split()) == 7


async def test_sdk_embeddings(sim_port: int) -> None:
    async with sdk(sim_port) as client:
        a = await client.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta"], dimensions=64,
                                           encoding_format="float")
        b = await client.embeddings.create(model="text-embedding-3-small", input="alpha", dimensions=64,
                                           encoding_format="float")
        raw = await client.embeddings.create(model="text-embedding-3-small", input="alpha", dimensions=64,
                                             encoding_format="base64")
        default = await client.embeddings.create(model="text-embedding-3-small", input="alpha")
    assert [len(d.embedding) for d in a.data] == [64, 64]
    assert a.data[0].embedding == b.data[0].embedding != a.data[1].embedding
    assert abs(math.fsum(x * x for x in a.data[0].embedding) - 1.0) < 1e-4
    assert isinstance(raw.data[0].embedding, str)
    assert list(struct.unpack("<64f", base64.b64decode(raw.data[0].embedding))) == b.data[0].embedding
    assert len(default.data[0].embedding) == 1536  # the SDK asks for base64 and decodes it
    assert a.usage.prompt_tokens == 2 + 1  # "alpha" ~2 tokens, "beta" 1


async def test_sdk_models_list(sim_port: int) -> None:
    async with sdk(sim_port) as client:
        page = await client.models.list()
        ids = [m.id async for m in page]
    assert ids == list(SimulationConfig().models)


async def test_sdk_unknown_model_is_404(sim_port: int) -> None:
    async with sdk(sim_port) as client:
        with pytest.raises(openai.NotFoundError) as err:
            await client.chat.completions.create(model="no-such-model", messages=MSGS)
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="no-such-model", messages=MSGS, stream=True)
    assert err.value.status_code == 404 and err.value.code == "model_not_found"


async def test_sdk_error_injection(spawn: Any) -> None:
    port500 = spawn("ttft_ms=1, itl_ms=1, error_rate=1.0")
    port429 = spawn("ttft_ms=1, itl_ms=1, error_rate=1.0, error_status=429")
    async with sdk(port500) as client:
        with pytest.raises(openai.InternalServerError) as err:
            await client.chat.completions.create(model="gpt-4o", messages=MSGS, stream=True)
        assert err.value.status_code == 500 and err.value.code == "simulated_error"
    async with sdk(port429) as client:
        with pytest.raises(openai.RateLimitError) as rate:
            await client.chat.completions.create(model="gpt-4o", messages=MSGS)
        assert rate.value.status_code == 429 and rate.value.response.headers["retry-after"] == "1"
        with pytest.raises(openai.RateLimitError):
            await client.embeddings.create(model="gpt-4o", input="x")


async def test_sdk_ttft_honoured(spawn: Any) -> None:
    port = spawn("ttft_ms=200, ttft_variance_percent=0, itl_ms=1")
    async with sdk(port) as client:
        start = time.perf_counter()
        stream = await client.chat.completions.create(model="gpt-4o", messages=MSGS, stream=True, max_tokens=3)
        first = None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
                break
        await stream.close()
    assert first is not None and first >= 0.200


def test_subprocess_exits_cleanly_on_sigterm_and_sigint() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc, port, stderr = _spawn()
        try:
            assert port > 0
            proc.send_signal(sig)
            assert proc.wait(timeout=10) == 0
            stderr.seek(0)
            assert "Traceback" not in stderr.read()
        finally:
            _stop(proc)
            stderr.close()
