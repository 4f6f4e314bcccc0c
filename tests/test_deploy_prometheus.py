"""A real Prometheus (Debian's `prometheus`) scrapes a real gateway under traffic; every Grafana panel's
expression and every alert's expression is sent to Prometheus' query API.

- Panels: the query must parse (status success) and return at least one series, so no panel is drawn on a
  metric that does not exist. Grafana's `$__rate_interval` becomes `30s` and the `$job` variable `.*`.
- Alerts: a threshold comparison may rightly return nothing on healthy traffic, so each alert expression must
  parse, name at least one metric, and every metric it names must have series in Prometheus: every alert is on
  ssegate's own metrics (or `up`), none on an exporter the stack may not run. The gateway is given a real Redis
  (`redis.url`), since `ssegate_redis_up` only exists then.

The traffic makes every series exist: streamed and non-streamed requests, a flaky provider (errors, retries,
fallbacks, breaker state), the cache (misses, then hits), the rate limiter (429s).
"""
from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import spawn, stop
from tests.redis_server import RedisServer

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "ssegate.json"
ALERTS = REPO / "docker" / "prometheus" / "alerts.yml"

GATEWAY_CONFIG = """
server: {host: 127.0.0.1, port: 0}
redis: {url: "${TEST_REDIS_URL}"}
logging: {format: json, level: warning}
circuit_breaker: {failure_threshold: 2, recovery_timeout: 60.0}
providers:
  - name: flaky
    type: simulated
    models: ["*"]
    priority: 1
    retry_attempts: 1
    simulation: {ttft_ms: 2.0, itl_ms: 1.0, response_tokens: 8, error_rate: 0.6, seed: 7}
  - name: steady
    type: simulated
    models: ["*"]
    priority: 2
    simulation: {ttft_ms: 2.0, itl_ms: 1.0, response_tokens: 8}
pipeline:
  - ratelimit:
      backend: memory
      anonymous: {rpm: 25, tpm: 1000000}
  - cache:
      backend: memory
  - router
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def _query(base: str, expr: str) -> dict:
    try:
        return _get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    except urllib.error.HTTPError as exc:  # 400 on a parse error: keep Prometheus' message
        return json.loads(exc.read())


def _post(url: str, body: dict) -> int:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code


def _traffic(gateway: str) -> list[int]:
    statuses = []
    url = gateway + "/v1/chat/completions"
    for i in range(30):  # bounded: 30 requests, the limiter admits 25 a minute
        body = {"model": "gpt-4o-mini", "temperature": 0, "stream": i % 2 == 0,
                "messages": [{"role": "user", "content": f"question {i % 4}"}]}
        statuses.append(_post(url, body))
    return statuses


def dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"].replace("$__rate_interval", "30s").replace('"$job"', '".*"'))
            for panel in dashboard["panels"] for target in panel["targets"]]


def alert_exprs() -> list[tuple[str, str]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [(rule["alert"], rule["expr"]) for group in groups for rule in group["rules"] if "alert" in rule]


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not found: .ci/run installs Debian's prometheus package")
    tmp = tmp_path_factory.mktemp("prom")
    (tmp / "ssegate.yaml").write_text(GATEWAY_CONFIG)
    redis = RedisServer().start()
    procs = []
    try:
        gateway_proc, line = spawn([sys.executable, "-m", "proxy", "serve", "--config", str(tmp / "ssegate.yaml")],
                                   "ssegate listening on", env={"TEST_REDIS_URL": redis.url})
        procs.append(gateway_proc)
        gateway = line.rsplit(" ", 1)[-1]
        target = gateway.removeprefix("http://")
        (tmp / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "ssegate", "static_configs": [{"targets": [target]}]}],
        }))
        port = _free_port()
        prom = subprocess.Popen([binary, f"--config.file={tmp / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(prom)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # until Prometheus has scraped the gateway once
            try:
                if _query(base, 'up{job="ssegate"} == 1')["data"]["result"]:
                    break
            except (OSError, KeyError, ValueError):  # ValueError: a plain-text 503 while Prometheus starts
                pass
            time.sleep(0.3)
        else:
            pytest.fail("Prometheus did not scrape the gateway within 20 s")
        statuses = _traffic(gateway)
        assert 429 in statuses and 200 in statuses, statuses
        # wait until the traffic's series have been scraped twice (rate() needs two samples)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            result = _query(base, "count_over_time(ssegate_ratelimited_total[30s])")["data"]["result"]
            if result and float(result[0]["value"][1]) >= 2:
                break
            time.sleep(0.3)
        yield base
    finally:
        for proc in reversed(procs):
            stop(proc)
        redis.stop()


def test_every_dashboard_panel_returns_series(prometheus: str) -> None:
    empty, failed = [], []
    for title, expr in dashboard_exprs():
        answer = _query(prometheus, expr)
        if answer.get("status") != "success":
            failed.append((title, expr, answer.get("error")))
        elif not answer["data"]["result"]:
            empty.append((title, expr))
    assert not failed, failed
    assert not empty, f"panels drawn on series that do not exist: {empty}"


def test_every_alert_expression_parses_and_its_metrics_exist(prometheus: str) -> None:
    for alert, expr in alert_exprs():
        answer = _query(prometheus, expr)
        assert answer.get("status") == "success", (alert, answer.get("error"))
        names = set(re.findall(r"\b(ssegate_[a-z_]+|up)\b", expr))
        assert names, f"{alert}: names no metric of ssegate's"
        for name in names:
            selector = 'up{job="ssegate"}' if name == "up" else name
            assert _query(prometheus, selector)["data"]["result"], f"{alert}: no series {name}"


def test_dashboard_covers_the_required_panels() -> None:
    exprs = " ".join(expr for _, expr in dashboard_exprs())
    for metric in ("ssegate_requests_total", "ssegate_request_duration_seconds_bucket",
                   "ssegate_time_to_first_token_seconds_bucket", "ssegate_inter_token_seconds_bucket",
                   "ssegate_active_streams", "ssegate_tokens_total", "ssegate_cache_hits_total",
                   "ssegate_cache_misses_total", "ssegate_ratelimited_total", "ssegate_circuit_state",
                   "ssegate_upstream_errors_total"):
        assert metric in exprs, metric
    dashboard = json.loads(DASHBOARD.read_text())
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    provisioning = yaml.safe_load((REPO / "docker/grafana/provisioning/dashboards/ssegate.yaml").read_text())
    assert provisioning["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    datasource = yaml.safe_load((REPO / "docker/grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
