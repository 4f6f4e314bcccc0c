"""Metrics, health, access log, CORS, trusted proxies and trace context, over real sockets."""
from __future__ import annotations

import asyncio
import re
import shutil
import subprocess

from unittest.mock import ANY

import aiohttp
import attrs
import orjson
import pytest
from structlog.testing import capture_logs

from proxy import Outcome
from proxy.config.schema import CircuitBreakerConfig, CorsConfig, ObservabilityConfig, RedisConfig
from proxy.config import load_config
from proxy.testing import GatewayServer, Script, config_for
from tests.helpers import CHAT, Recorder, read_stream

STREAM = {**CHAT, "stream": True}


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample line of a Prometheus text exposition (0 if absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            series, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in series for k, v in labels.items()):
                return float(value)
    return 0.0


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            return r.status, await r.text()


async def test_metrics_after_known_traffic(upstream, upstream2, gateway_factory):
    upstream.script = Script(status=503, error="down")
    gw = await gateway_factory(config_for(upstream, upstream2))
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.post(gw.base_url + "/chat/completions", json=CHAT) as r:
                assert r.status == 200
        for _ in range(2):
            await read_stream(gw.base_url + "/chat/completions", STREAM)
        async with s.post(gw.base_url + "/chat/completions", json={"model": "m"}) as r:
            assert r.status == 400
    status, text = await get(gw.url + "/metrics")
    assert status == 200
    assert sample(text, "ssegate_requests_total", route="chat.completions", provider="up1", status="200") == 5
    assert sample(text, "ssegate_requests_total", route="chat.completions", model="unknown", status="400") == 1
    assert sample(text, "ssegate_request_duration_seconds_count", route="chat.completions", stream="false") == 4
    assert sample(text, "ssegate_request_duration_seconds_count", route="chat.completions", stream="true") == 2
    assert sample(text, "ssegate_request_duration_seconds_bucket", stream="true", le="+Inf") == 2
    assert sample(text, "ssegate_time_to_first_token_seconds_count", provider="up1") == 5
    assert sample(text, "ssegate_inter_token_seconds_count", provider="up1") == 2
    assert sample(text, "ssegate_tokens_total", type="completion", provider="up1") == 5 * 4
    assert sample(text, "ssegate_upstream_errors_total", provider="up0", kind="status") == 5
    assert sample(text, "ssegate_fallbacks_total") == 5
    assert sample(text, "ssegate_overhead_seconds_count") == 5
    assert sample(text, "ssegate_circuit_state", provider="up0") == 2  # 5 consecutive failures: open
    assert sample(text, "ssegate_active_streams") == 0
    assert sample(text, "ssegate_tokens_total", type="prompt", tier="anonymous") == 5 * 7
    assert sample(text, "process_resident_memory_bytes") > 10_000_000
    assert sample(text, "process_cpu_seconds_total") > 0
    assert "request_id" not in text and "test-key" not in text


async def test_metrics_folded_in_batches_count_every_exchange(upstream, gateway_factory, monkeypatch):
    """exchange_done only records; records are folded every FOLD_EVERY exchanges and before a scrape or a
    summary. With a batch of 2, five exchanges fold twice on their own and once more at the scrape."""
    import plugins.metrics

    monkeypatch.setattr(plugins.metrics, "FOLD_EVERY", 2)
    gw = await gateway_factory(config_for(upstream))
    async with aiohttp.ClientSession() as s:
        for _ in range(4):
            async with s.post(gw.base_url + "/chat/completions", json=CHAT) as r:
                assert r.status == 200
        await read_stream(gw.base_url + "/chat/completions", STREAM)
    series = gw.gateway.plugin("metrics").series
    assert len(series.pending) == 1  # the fifth waits for the next fold
    _, text = await get(gw.url + "/metrics")
    assert series.pending == []
    assert sample(text, "ssegate_requests_total", route="chat.completions", status="200") == 5
    assert sample(text, "ssegate_request_duration_seconds_count", stream="false") == 4
    assert sample(text, "ssegate_request_duration_seconds_bucket", stream="false", le="+Inf") == 4
    assert sample(text, "ssegate_time_to_first_token_seconds_count", provider="up0") == 5
    assert sample(text, "ssegate_tokens_total", type="completion", provider="up0") == 5 * 4
    assert sample(text, "ssegate_overhead_seconds_count") == 5
    _, summary = await get(gw.url + "/metrics/summary")
    assert orjson.loads(summary)["requests"] == {"total": 5, "per_second": ANY, "streams": 1}


def test_observe_many_fills_the_buckets_observe_would():
    from proxy.metrics import LATENCY_BUCKETS, FastHistogram, Registry, histogram

    one, many = (FastHistogram(histogram(Registry(), "h", "h", LATENCY_BUCKETS), ("k",)) for _ in range(2))
    values = [0.0, 0.005, 0.0051, 0.01, 0.3, 0.3, 2.5, 7.0, 299.0, 301.0, 1e9]
    for v in values:
        one.observe(("a",), v)
    many.observe_many(("a",), list(reversed(values[:4])))
    many.observe_many(("a",), values[4:])
    assert many.series == one.series
    assert one.series[("a",)][:2] == [2, 2]  # "le": 0.005 falls in the 0.005 bucket, 0.0051 in the next


async def test_made_up_model_names_cannot_fill_the_model_label_slots(upstream, gateway_factory, monkeypatch):
    """A provider with ``models: ["*"]`` routes any name a client makes up, and its upstream answers 404: such
    names are labelled ``other`` and take no slot, so real models keep their own series."""
    import plugins.metrics

    monkeypatch.setattr(plugins.metrics, "MAX_MODELS", 3)
    gw = await gateway_factory(config_for(upstream))
    async with aiohttp.ClientSession() as s:
        upstream.script = Script(status=404, error="no such model")
        for i in range(5):
            async with s.post(gw.base_url + "/chat/completions", json={**CHAT, "model": f"bogus-{i}"}) as r:
                assert r.status == 404
        upstream.script = Script()
        for model in ("gpt-4o", "gpt-4o-mini"):
            async with s.post(gw.base_url + "/chat/completions", json={**CHAT, "model": model}) as r:
                assert r.status == 200
    _, text = await get(gw.url + "/metrics")
    assert 'model="bogus-' not in text
    assert sample(text, "ssegate_requests_total", model="other", status="404") == 5
    assert sample(text, "ssegate_requests_total", model="gpt-4o", status="200") == 1
    assert sample(text, "ssegate_requests_total", model="gpt-4o-mini", status="200") == 1


async def test_counters_survive_a_config_reload(tmp_path, upstream):
    """A reload builds new plugin instances; Prometheus counters must carry on, never go back."""
    path = tmp_path / "ssegate.yaml"
    path.write_text(f"server: {{admin_key: adm}}\nproviders:\n  - name: p\n    type: openai\n"
                    f"    base_url: {upstream.base_url}\n")
    gw = await GatewayServer.start(load_config(str(path)), config_path=str(path))
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(3):
                async with s.post(gw.base_url + "/chat/completions", json=CHAT) as r:
                    assert r.status == 200
            _, text = await get(gw.url + "/metrics")
            assert sample(text, "ssegate_requests_total", provider="p", status="200") == 3
            async with s.post(gw.url + "/admin/reload", headers={"Authorization": "Bearer adm"}) as r:
                assert r.status == 200
            assert gw.current is not gw.gateway
            async with s.post(gw.base_url + "/chat/completions", json=CHAT) as r:
                assert r.status == 200
            _, text = await get(gw.url + "/metrics")
            assert sample(text, "ssegate_requests_total", provider="p", status="200") == 4
            assert sample(text, "ssegate_request_duration_seconds_count", stream="false") == 4
            _, summary = await get(gw.url + "/metrics/summary")
            assert orjson.loads(summary)["requests"]["total"] == 4
    finally:
        await gw.close()


async def test_active_streams_rise_and_fall(upstream, gateway_factory):
    upstream.script = Script(texts=["a", "b", "c", "d"], delay=0.25)
    gw = await gateway_factory(config_for(upstream))
    streams = [asyncio.create_task(read_stream(gw.base_url + "/chat/completions", STREAM)) for _ in range(3)]
    await asyncio.sleep(0.4)
    _, text = await get(gw.url + "/metrics")
    assert sample(text, "ssegate_active_streams") == 3
    await asyncio.gather(*streams)
    _, text = await get(gw.url + "/metrics")
    assert sample(text, "ssegate_active_streams") == 0


async def test_promtool_accepts_the_exposition(upstream, gateway_factory, tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool is required (Debian package prometheus; .ci/run installs it)"
    gw = await gateway_factory(config_for(upstream))
    await read_stream(gw.base_url + "/chat/completions", STREAM)
    _, text = await get(gw.url + "/metrics")
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_metrics_summary(upstream, gateway_factory):
    gw = await gateway_factory(config_for(upstream))
    for _ in range(4):
        await read_stream(gw.base_url + "/chat/completions", STREAM)
    await read_stream(gw.base_url + "/chat/completions", {"model": "m"})
    status, text = await get(gw.url + "/metrics/summary")
    import orjson

    summary = orjson.loads(text)
    assert status == 200
    assert summary["requests"]["total"] == 5 and summary["requests"]["streams"] == 4
    assert summary["latency_seconds"]["p50"] > 0 and summary["ttft_seconds"]["p99"] > 0
    assert summary["errors"] == {"total": 1, "rate": 0.2, "by_class": {"client": 1}}
    assert summary["tokens"]["completion"] == 16 and summary["active_streams"] == 0
    window = summary["window"]  # from the first exchange's end to the last one's
    assert window["requests"] == 5 and 0 < window["seconds"] < 30
    assert summary["requests"]["per_second"] == pytest.approx(5 / window["seconds"], rel=0.1)


async def test_health_endpoints(upstream, gateway_factory):
    gw = await gateway_factory(config_for(upstream))
    status, text = await get(gw.url + "/health/live")
    assert status == 200 and '"loop_lag_seconds"' in text
    status, text = await get(gw.url + "/health")
    import orjson

    body = orjson.loads(text)
    assert status == 200 and body["status"] == "healthy" and body["version"]
    assert body["checks"]["provider:up0"]["circuit"] == "closed" and body["metrics"] is not None
    # (a stalled loop's 503: tests/test_watchdog.py)


async def test_health_is_degraded_by_upstream_failures_not_by_bad_requests(upstream, gateway_factory):
    """A client sending 25 bad requests leaves /health healthy; 25 upstream failures make it degraded."""
    gw = await gateway_factory(attrs.evolve(config_for(upstream), circuit_breaker=CircuitBreakerConfig(
        failure_threshold=1000)))
    async with aiohttp.ClientSession() as s:
        for _ in range(25):
            async with s.post(gw.base_url + "/chat/completions", data=b"{not json") as resp:
                assert resp.status == 400
    status, text = await get(gw.url + "/health")
    body = orjson.loads(text)
    assert status == 200 and body["status"] == "healthy", body["warnings"]
    assert body["metrics"]["errors"]["by_class"] == {"client": 25}
    upstream.script = Script(status=500)
    async with aiohttp.ClientSession() as s:
        for _ in range(25):
            async with s.post(gw.base_url + "/chat/completions", json=CHAT) as resp:
                assert resp.status == 500
    status, text = await get(gw.url + "/health")
    body = orjson.loads(text)
    assert status == 200 and body["status"] == "degraded"
    assert body["warnings"] == ["High error rate: 50.0% of requests failed in the gateway or upstream"]


async def test_readiness_flips_with_all_breakers_open(upstream, gateway_factory):
    upstream.script = Script(status=500)
    config = attrs.evolve(config_for(upstream), circuit_breaker=CircuitBreakerConfig(failure_threshold=1,
                                                                                     recovery_timeout=60))
    gw = await gateway_factory(config)
    assert (await get(gw.url + "/health/ready"))[0] == 200
    await read_stream(gw.base_url + "/chat/completions", CHAT)
    status, text = await get(gw.url + "/health/ready")
    assert status == 503 and "no provider with a closed or half-open circuit" in text
    status, text = await get(gw.url + "/health")
    assert status == 503 and '"unhealthy"' in text


async def test_all_circuits_open_may_leave_the_replica_ready(upstream, gateway_factory):
    upstream.script = Script(status=500)
    config = attrs.evolve(config_for(upstream), circuit_breaker=CircuitBreakerConfig(failure_threshold=1,
                                                                                     recovery_timeout=60),
                          observability=ObservabilityConfig(ready_requires_providers=False))
    gw = await gateway_factory(config)
    await read_stream(gw.base_url + "/chat/completions", CHAT)
    assert (await get(gw.url + "/health/ready"))[0] == 200
    async with aiohttp.ClientSession() as s:  # the gateway answers, in OpenAI format
        async with s.post(gw.base_url + "/chat/completions", json=CHAT) as r:
            assert r.status == 503 and (await r.json())["error"]["code"] == "provider_unavailable"
    status, text = await get(gw.url + "/health")
    assert status == 200 and '"degraded"' in text


@pytest.mark.parametrize("on_backend_error,ready_requires_redis,ready_while_down", [
    ("fail_closed", False, False),  # the rate limiter cannot do without Redis: it fails readiness
    ("fail_open", False, True),  # it can: the replica stays in the Service, unlimited, degraded
    ("fail_open", True, False),  # the operator asked for Redis itself
])
async def test_readiness_with_redis_down_follows_what_needs_it(upstream, gateway_factory, redis_server,
                                                                on_backend_error, ready_requires_redis,
                                                                ready_while_down):
    from proxy.config.schema import PipelineEntry

    config = attrs.evolve(config_for(upstream, pipeline=[PipelineEntry("ratelimit", {
        "backend": "redis", "on_backend_error": on_backend_error, "backend_retry_interval": 0.1,
        "anonymous": {"rpm": 1000}}), "router"]),
        redis=RedisConfig(url=redis_server.url, socket_timeout=0.3, connect_timeout=0.3),
        observability=ObservabilityConfig(ready_requires_redis=ready_requires_redis))
    gw = await gateway_factory(config)
    assert (await get(gw.url + "/health/ready"))[0] == 200
    redis_server.stop()
    try:
        async with aiohttp.ClientSession() as s:  # a request finds the backend gone
            async with s.post(gw.base_url + "/chat/completions", json=CHAT) as r:
                assert r.status == (200 if on_backend_error == "fail_open" else 503)
        status, text = await get(gw.url + "/health/ready")
        assert (status == 200) == ready_while_down, text
        status, text = await get(gw.url + "/health")
        assert '"degraded"' in text or '"unhealthy"' in text
    finally:
        redis_server.start()
    for _ in range(50):  # bounded: the pool reconnects by itself
        async with aiohttp.ClientSession() as s:
            async with s.post(gw.base_url + "/chat/completions", json=CHAT) as r:
                pass
        if (await get(gw.url + "/health/ready"))[0] == 200:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("readiness did not recover after Redis came back")


async def test_readiness_flips_with_redis_down_and_back(upstream, gateway_factory, redis_server):
    gw = await gateway_factory(attrs.evolve(config_for(upstream), redis=RedisConfig(url=redis_server.url,
                                                                                    socket_timeout=0.3,
                                                                                    connect_timeout=0.3),
                                            observability=ObservabilityConfig(ready_requires_redis=True)))
    assert (await get(gw.url + "/health/ready"))[0] == 200
    for _ in range(20):  # the metrics plugin's probe has pinged once
        if sample((await get(gw.url + "/metrics"))[1], "ssegate_redis_up") == 1:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("ssegate_redis_up never became 1")
    redis_server.stop()
    status, text = await get(gw.url + "/health/ready")
    assert status == 503 and "redis unreachable" in text
    redis_server.start()
    for _ in range(20):  # bounded: the pool reconnects by itself
        if (await get(gw.url + "/health/ready"))[0] == 200:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("readiness did not recover after Redis came back")


@pytest.mark.parametrize("turns", [1, 40])
async def test_access_line_carries_the_prompt_only_with_log_prompts(upstream, gateway_factory, turns):
    """``observability.log_prompts: true`` puts the messages in the line, for a short request and for a long one
    (whose parsed body the gateway lets go once routed: the line parses it again)."""
    messages = [{"role": "user", "content": f"turn {i} " + "lorem ipsum " * 40} for i in range(turns)]
    for log_prompts in (False, True):
        config = config_for(upstream)
        config = attrs.evolve(config, observability=attrs.evolve(config.observability, log_prompts=log_prompts))
        gw = await gateway_factory(config)
        with capture_logs() as logs:
            await read_stream(gw.base_url + "/chat/completions", {"model": "m", "stream": True, "messages": messages})
        (line,) = [e for e in logs if e["event"] == "access"]
        assert line["status"] == 200
        assert line.get("messages") == (messages if log_prompts else None)


async def test_access_line_per_exchange(upstream, gateway_factory):
    config = attrs.evolve(config_for(upstream), server=attrs.evolve(config_for(upstream).server,
                                                                    trusted_proxies=("127.0.0.0/8",)))
    gw = await gateway_factory(config)
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    with capture_logs() as logs:
        await read_stream(gw.base_url + "/chat/completions", STREAM,
                          {"X-Request-ID": "req-1", "traceparent": f"00-{trace}-00f067aa0ba902b7-01",
                           "X-Forwarded-For": "203.0.113.9, 127.0.0.5", "Authorization": "Bearer sk-secret"})
        await read_stream(gw.base_url + "/chat/completions", {"model": "m"})
    access = [e for e in logs if e["event"] == "access"]
    assert len(access) == 2
    line = access[0]
    assert line["request_id"] == "req-1" and line["trace_id"] == trace
    assert line["client_ip"] == "203.0.113.9"
    assert (line["model"], line["provider"], line["status"], line["stream"]) == ("gpt-4o-mini", "up0", 200, True)
    assert line["prompt_tokens"] == 7 and line["completion_tokens"] == 4 and line["retries"] == 0
    assert line["ttft_ms"] > 0 and line["duration_ms"] >= line["ttft_ms"]
    assert access[1]["status"] == 400 and access[1]["error_code"] == "missing_required_parameter"
    assert "sk-secret" not in repr(logs) and "Say hello" not in repr(logs)
    sent = upstream.headers[0]["traceparent"]
    assert re.fullmatch(f"00-{trace}-[0-9a-f]{{16}}-01", sent) and sent != f"00-{trace}-00f067aa0ba902b7-01"


async def test_requests_no_route_matches_are_logged_and_counted(upstream, gateway_factory):
    """Scans of unknown paths, and wrong methods on known ones, show in the access log and the metrics."""
    rec = Recorder()
    gw = await gateway_factory(config_for(upstream, pipeline=["rec", "router"]), plugins={"rec": rec})
    with capture_logs() as logs:
        async with aiohttp.ClientSession() as s:
            async with s.get(gw.url + "/wp-admin/setup.php?x=1") as r:
                assert r.status == 404
            async with s.get(gw.base_url + "/chat/completions") as r:
                assert r.status == 405
    assert [(e.endpoint, e.status, e.outcome, e.state["path"]) for e in rec.done] == [
        ("unmatched", 404, Outcome.REJECTED, "GET /wp-admin/setup.php"),
        ("unmatched", 405, Outcome.REJECTED, "GET /v1/chat/completions")]
    assert all(e.request_id and e.client_ip == "127.0.0.1" for e in rec.done)
    access = [e for e in logs if e["event"] == "access"]
    assert [(a["route"], a["status"], a["path"]) for a in access] == [
        ("unmatched", 404, "GET /wp-admin/setup.php"), ("unmatched", 405, "GET /v1/chat/completions")]
    _, text = await get(gw.url + "/metrics")
    assert sample(text, "ssegate_requests_total", route="unmatched", status="404") == 1
    assert sample(text, "ssegate_requests_total", route="unmatched", status="405") == 1


async def test_cors_preflight_and_headers(upstream, gateway_factory):
    config = attrs.evolve(config_for(upstream), cors=CorsConfig(allow_origins=("https://chat.example",),
                                                                allow_credentials=True))
    gw = await gateway_factory(config)
    preflight = {"Origin": "https://chat.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    async with aiohttp.ClientSession() as s:
        async with s.options(gw.base_url + "/chat/completions", headers=preflight) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "https://chat.example"
            assert r.headers["Access-Control-Allow-Credentials"] == "true"
            assert "POST" in r.headers["Access-Control-Allow-Methods"]
            assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
        async with s.options(gw.base_url + "/chat/completions",
                             headers={**preflight, "Origin": "https://evil.example"}) as r:
            assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
        async with s.post(gw.base_url + "/chat/completions", json=STREAM,
                          headers={"Origin": "https://chat.example"}) as r:
            await r.read()
            assert r.headers["Access-Control-Allow-Origin"] == "https://chat.example"
            assert "x-ssegate-provider" in r.headers["Access-Control-Expose-Headers"]
        async with s.post(gw.base_url + "/chat/completions", json=CHAT,
                          headers={"Origin": "https://evil.example"}) as r:
            assert "Access-Control-Allow-Origin" not in r.headers


def test_summary_error_classes():
    """The summary classes each exchange from its record when asked (nothing is computed per exchange for it)."""
    from plugins.metrics import error_class
    from proxy import Outcome

    assert error_class(200, Outcome.OK, True) is None
    assert error_class(200, Outcome.CLIENT_DISCONNECT, True) is None  # a stream the client left: not an error
    assert error_class(200, Outcome.ERROR, True) == "upstream"  # failed mid-stream (an SSE error event)
    assert error_class(200, Outcome.TIMEOUT, True) == "timeout"
    assert error_class(400, Outcome.REJECTED, False) == "client"
    assert error_class(499, Outcome.CLIENT_DISCONNECT, True) == "client_disconnect"
    assert error_class(502, Outcome.ERROR, True) == "upstream"
    assert error_class(500, Outcome.ERROR, False) == "gateway"  # failed before any upstream was tried
    assert error_class(504, Outcome.TIMEOUT, True) == "timeout"
