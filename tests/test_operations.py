"""Operations: config reload under live streams (admin API and SIGHUP) and graceful drain on SIGTERM."""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap

import aiohttp
import orjson
import pytest
from structlog.testing import capture_logs

from proxy.config import load_config
from proxy.testing import GatewayServer, Script
from tests.conftest import spawn, stop
from tests.helpers import CHAT, content_of, data_events, read_stream

STREAM = {**CHAT, "stream": True}


def write_config(path, upstream, admin_key="adm-secret", grace=30.0):
    path.write_text(textwrap.dedent(f"""\
        server: {{admin_key: {admin_key}, shutdown_grace_seconds: {grace}}}
        providers:
          - name: "p{upstream.port}"
            type: openai
            base_url: {upstream.base_url}
        """))


async def test_reload_under_100_live_streams(tmp_path, upstream, upstream2):
    upstream.script = Script(texts=[f"a{i} " for i in range(10)], delay=0.08)
    upstream2.script = Script(texts=["new"])
    path = tmp_path / "ssegate.yaml"
    write_config(path, upstream)
    gw = await GatewayServer.start(load_config(str(path)), config_path=str(path))
    try:
        streams = [asyncio.create_task(read_stream(gw.base_url + "/chat/completions", STREAM)) for _ in range(100)]
        await asyncio.sleep(0.3)
        write_config(path, upstream2)
        async with aiohttp.ClientSession() as s:
            async with s.post(gw.url + "/admin/reload", headers={"Authorization": "Bearer adm-secret"}) as r:
                assert r.status == 200, await r.text()
            async with s.post(gw.base_url + "/chat/completions", json=CHAT) as r:
                assert r.headers["x-ssegate-provider"] == f"p{upstream2.port}"
        results = await asyncio.wait_for(asyncio.gather(*streams), 30)
        expected = "".join(f"a{i} " for i in range(10))
        assert all(status == 200 and content_of(ev) == expected and data_events(ev)[-1] == "[DONE]"
                   for status, _, ev in results)
        assert gw.current is not gw.gateway
        await asyncio.sleep(0.1)
        assert gw.gateway.in_flight == 0
        assert all(p._session is None for p in gw.gateway.providers.values())  # the old pools were closed

        path.write_text("providers:\n  - name: x\n    type: openai\n    base_url: nope\n    timout: 1\n")
        async with aiohttp.ClientSession() as s:
            async with s.post(gw.url + "/admin/reload", headers={"Authorization": "Bearer adm-secret"}) as r:
                assert r.status == 422
                body = await r.json()
            assert any("timout" in p and ":5:" in p for p in body["problems"])
            async with s.post(gw.base_url + "/chat/completions", json=CHAT) as r:
                assert r.status == 200 and r.headers["x-ssegate-provider"] == f"p{upstream2.port}"
    finally:
        await gw.close()


def write_pool_config(path, upstream, timeout=600, max_connections=100):
    path.write_text(textwrap.dedent(f"""\
        server: {{admin_key: adm-secret}}
        providers:
          - {{name: p, type: openai, base_url: "{upstream.base_url}", timeout: {timeout},
              max_connections: {max_connections}}}
        """))


async def test_a_reload_keeps_a_providers_open_connections_while_its_pool_is_configured_as_before(tmp_path,
                                                                                              upstream):
    """The upstream sees the same client port before and after a reload that changed the provider's timeout; a
    reload that changed its pool opens a new one, and the old one is closed once its gateway retired."""
    upstream.script = Script(texts=["ok"])
    path = tmp_path / "ssegate.yaml"
    write_pool_config(path, upstream)
    gw = await GatewayServer.start(load_config(str(path)), config_path=str(path))
    try:
        async with aiohttp.ClientSession() as s:
            async def ask() -> int:
                async with s.post(gw.base_url + "/chat/completions", json=CHAT) as r:
                    assert r.status == 200
                    await r.read()
                return upstream.peers[-1][1]

            async def reload() -> None:
                async with s.post(gw.url + "/admin/reload", headers={"Authorization": "Bearer adm-secret"}) as r:
                    assert r.status == 200, await r.text()
                await asyncio.sleep(0.05)  # the old gateway retires (nothing in flight)

            first = await ask()
            old_session = gw.current.providers["p"]._session
            write_pool_config(path, upstream, timeout=300)
            await reload()
            assert gw.current.providers["p"].config.timeout == 300
            assert await ask() == first  # the same connection, no new handshake
            assert gw.current.providers["p"]._session is old_session and not old_session.closed

            write_pool_config(path, upstream, timeout=300, max_connections=50)
            await reload()
            assert await ask() != first
            assert old_session.closed
            assert len(gw.current.process_state["ssegate.upstream_sessions"]) == 1
    finally:
        await gw.close()
    assert not gw.current.process_state["ssegate.upstream_sessions"]  # closed with the last provider


async def test_admin_reload_needs_the_admin_key(tmp_path, upstream):
    path = tmp_path / "ssegate.yaml"
    write_config(path, upstream)
    gw = await GatewayServer.start(load_config(str(path)), config_path=str(path))
    try:
        with capture_logs() as logs:
            async with aiohttp.ClientSession() as s:
                async with s.post(gw.url + "/admin/reload") as r:
                    assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_admin_key"
                async with s.post(gw.url + "/admin/reload", headers={"Authorization": "Bearer wrong"}) as r:
                    assert r.status == 401
        failed = [(e["key_given"], e["client_ip"]) for e in logs if e["event"] == "admin_auth_failed"]
        assert failed == [(False, "127.0.0.1"), (True, "127.0.0.1")]  # logged, the key never
        assert not any("wrong" in str(e) for e in logs)
    finally:
        await gw.close()
    path.write_text(f"providers:\n  - name: a\n    base_url: {upstream.base_url}\n")
    gw = await GatewayServer.start(load_config(str(path)), config_path=str(path))
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(gw.url + "/admin/reload", headers={"Authorization": "Bearer x"}) as r:
                assert r.status == 403 and (await r.json())["error"]["code"] == "admin_disabled"
    finally:
        await gw.close()


def serve_process(path):
    proc, line = spawn([sys.executable, "-m", "proxy", "serve", "--config", str(path), "--port", "0"],
                       "ssegate listening on")
    return proc, line.rsplit(" ", 1)[-1]


async def test_sighup_reloads_the_config_file(tmp_path, upstream, upstream2):
    path = tmp_path / "ssegate.yaml"
    write_config(path, upstream)
    proc, url = serve_process(path)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/v1/chat/completions", json=CHAT) as r:
                assert r.headers["x-ssegate-provider"] == f"p{upstream.port}"
            write_config(path, upstream2)
            proc.send_signal(signal.SIGHUP)
            for _ in range(50):  # bounded: 5 s
                async with s.post(url + "/v1/chat/completions", json=CHAT) as r:
                    if r.headers["x-ssegate-provider"] == f"p{upstream2.port}":
                        break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("SIGHUP did not load the new config")
    finally:
        stop(proc)


async def test_sigterm_drains_live_streams_then_exits_0(tmp_path, upstream):
    upstream.script = Script(texts=[f"t{i} " for i in range(8)], delay=0.1)
    path = tmp_path / "ssegate.yaml"
    write_config(path, upstream, grace=10)
    proc, url = serve_process(path)
    try:
        streams = [asyncio.create_task(read_stream(url + "/v1/chat/completions", STREAM)) for _ in range(20)]
        await asyncio.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.1)
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/health/ready") as r:
                assert r.status == 503
            async with s.post(url + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 503 and (await r.json())["error"]["code"] == "server_shutting_down"
            # every API route, not only the completions (a load balancer retries elsewhere)
            anthropic = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
            for method, path, body in (("GET", "/v1/models", None), ("GET", "/v1/models/gpt-4o-mini", None),
                                       ("POST", "/v1/messages", anthropic),
                                       ("POST", "/v1/messages/count_tokens", anthropic)):
                async with s.request(method, url + path, json=body) as r:
                    assert r.status == 503, path
                    error = (await r.json())["error"]
                    if path.startswith("/v1/messages"):  # the Anthropic ingress answers in Anthropic's format
                        assert (await r.json())["type"] == "error" and "shutting down" in error["message"]
                    else:
                        assert error["code"] == "server_shutting_down"
                    assert r.headers["Retry-After"] == "1" and "X-Request-ID" in r.headers
        results = await asyncio.wait_for(asyncio.gather(*streams), 20)
        expected = "".join(f"t{i} " for i in range(8))
        assert sum(1 for _, _, ev in results if content_of(ev) == expected and data_events(ev)[-1] == "[DONE]") == 20
        assert await asyncio.to_thread(proc.wait, 15) == 0
    finally:
        stop(proc)


async def test_sigterm_past_the_grace_ends_streams_with_an_error_event(tmp_path, upstream):
    upstream.script = Script(texts=[f"t{i} " for i in range(100)], delay=0.1)
    path = tmp_path / "ssegate.yaml"
    write_config(path, upstream, grace=0.5)
    proc, url = serve_process(path)
    try:
        stream = asyncio.create_task(read_stream(url + "/v1/chat/completions", STREAM))
        await asyncio.sleep(0.4)
        proc.send_signal(signal.SIGTERM)
        status, _, events = await asyncio.wait_for(stream, 20)
        objs = data_events(events)
        assert status == 200 and objs[-1] == "[DONE]"
        assert objs[-2]["error"]["code"] == "server_shutting_down"
        assert 0 < len(content_of(events)) < len("".join(f"t{i} " for i in range(100)))
        assert await asyncio.to_thread(proc.wait, 15) == 0
    finally:
        stop(proc)


async def served_by(session: aiohttp.ClientSession, base_url: str) -> str:
    """The provider that answered one chat request."""
    async with session.post(base_url + "/chat/completions", json=CHAT) as r:
        assert r.status == 200
        return r.headers["x-ssegate-provider"]


async def until_served_by(session: aiohttp.ClientSession, base_url: str, provider: str, failure: str) -> None:
    for _ in range(50):  # bounded: 5 s
        if await served_by(session, base_url) == provider:
            return
        await asyncio.sleep(0.1)
    pytest.fail(failure)


def _configmap_publish(mount, version: int, text: str) -> None:
    """Update a directory the way the kubelet updates a ConfigMap volume: the files go into a new hidden
    directory, then the ``..data`` symlink is swapped to it atomically (``ssegate.yaml`` -> ``..data/ssegate.yaml``
    never changes)."""
    target = mount / f"..v{version}"
    target.mkdir(parents=True)
    (target / "ssegate.yaml").write_text(text)
    fresh = mount / "..data_tmp"
    fresh.symlink_to(target.name)
    os.replace(fresh, mount / "..data")
    if not (mount / "ssegate.yaml").is_symlink():
        (mount / "ssegate.yaml").symlink_to("..data/ssegate.yaml")


async def test_config_watch_reloads_a_configmap_update_and_refuses_a_bad_one(tmp_path, upstream, upstream2):
    """Also: ``--port 0`` on the command line is applied to every reloaded config, so a reload does not warn
    that the server section changed (it logged ``config_reload_server_unchanged`` on every reload before)."""
    def text(up) -> str:
        return textwrap.dedent(f"""\
            server: {{config_watch_interval: 0.1}}
            providers:
              - {{name: "p{up.port}", type: openai, base_url: "{up.base_url}"}}
            """)

    mount = tmp_path / "config"
    _configmap_publish(mount, 1, text(upstream))
    proc, url = serve_process(mount / "ssegate.yaml")
    try:
        async with aiohttp.ClientSession() as s:
            async def provider() -> str:
                return await served_by(s, url + "/v1")

            assert await provider() == f"p{upstream.port}"
            _configmap_publish(mount, 2, text(upstream2).replace("providers:", "providers: [oops"))
            await asyncio.sleep(1.0)  # ten checks: the broken config is refused, the old one keeps serving
            assert await provider() == f"p{upstream.port}"
            _configmap_publish(mount, 3, text(upstream2))
            await until_served_by(s, url + "/v1", f"p{upstream2.port}", "the watch did not load the new config")
    finally:
        stop(proc)
    events = [orjson.loads(line)["event"] for line in proc.stderr.read().splitlines() if line.startswith("{")]
    reloads = [e for e in events if e.startswith("config_") and e != "config_loaded"]  # (startup's line)
    # Each change is read once: the refused config is not retried every 0.1 s.
    assert reloads == ["config_changed", "config_reload_refused", "config_changed", "config_reloaded"], reloads


async def test_config_watch_sees_the_environment_layer_appear(tmp_path, monkeypatch, upstream, upstream2):
    """The layer ``<stem>.<environment>.yaml`` is watched before it exists: creating it reloads."""
    from proxy.app_keys import RELOADER
    from proxy.tasks import stop_task

    monkeypatch.setenv("SSEGATE_ENVIRONMENT", "staging")
    path = tmp_path / "ssegate.yaml"
    write_config(path, upstream)
    gw = await GatewayServer.start(load_config(str(path)), config_path=str(path))
    watcher = asyncio.get_running_loop().create_task(gw.app[RELOADER].watch(0.05))
    try:
        async with aiohttp.ClientSession() as s:
            async def provider() -> str:
                return await served_by(s, gw.base_url)

            assert await provider() == f"p{upstream.port}"
            write_config(tmp_path / "ssegate.staging.yaml", upstream2)
            await until_served_by(s, gw.base_url, f"p{upstream2.port}", "creating the environment layer did not reload")
        assert gw.app[RELOADER].reloads == 1
    finally:
        await stop_task(watcher)
        await gw.close()


def metric_value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{}"):
            return float(line.rsplit(" ", 1)[-1])
    raise AssertionError(f"{name} not in /metrics")


async def test_after_a_reload_the_old_configs_streams_count_and_drain_and_access_lines_are_kept(tmp_path, upstream):
    """A reload while a stream runs on the old config: the gauges still count it, SIGTERM drains it (it outlasts
    aiohttp's 5 s shutdown timeout, which cut it when only the new config's Gateway was drained), and every access
    line reaches stderr with ``PYTHONUNBUFFERED=1``, as the container image runs (the reload used to swap the line
    writer under the access log, whose lines then stayed in a buffer never flushed, and leak a descriptor)."""
    upstream.script = Script(texts=[f"t{i} " for i in range(65)], delay=0.1)  # 6.5 s
    path = tmp_path / "ssegate.yaml"
    write_config(path, upstream, grace=20)
    proc, line = spawn([sys.executable, "-m", "proxy", "serve", "--config", str(path), "--port", "0"],
                       "ssegate listening on", env={"PYTHONUNBUFFERED": "1"})
    url = line.rsplit(" ", 1)[-1]
    admin = {"Authorization": "Bearer adm-secret"}
    try:
        stream = asyncio.create_task(read_stream(url + "/v1/chat/completions", STREAM))
        async with aiohttp.ClientSession() as s:
            await asyncio.sleep(0.5)
            async with s.post(url + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200
            fds = []
            for _ in range(3):
                async with s.post(url + "/admin/reload", headers=admin) as r:
                    assert r.status == 200, await r.text()
                async with s.get(url + "/metrics") as r:
                    text = await r.text()
                assert metric_value(text, "ssegate_active_streams") == 1
                assert metric_value(text, "ssegate_requests_in_flight") == 1
                fds.append(metric_value(text, "process_open_fds"))
            assert fds[0] == fds[-1]  # no descriptor per reload
            async with s.post(url + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        status, _, events = await asyncio.wait_for(stream, 20)
        assert status == 200 and content_of(events) == "".join(f"t{i} " for i in range(65))
        assert data_events(events)[-1] == "[DONE]"
        assert await asyncio.to_thread(proc.wait, 15) == 0
        stderr = proc.stderr.read()
    finally:
        stop(proc)
    lines = [orjson.loads(x) for x in stderr.splitlines() if x.startswith("{")]
    [loaded] = [x for x in lines if x["event"] == "config_loaded"]  # what runs, said once at startup
    assert loaded["files"] == [str(path)] and loaded["providers"] == [f"p{upstream.port}"] and loaded["version"]
    draining = [x for x in lines if x["event"] == "draining"]
    assert [(x["in_flight"], x["gateways"]) for x in draining] == [(1, 2)]  # the stream's Gateway is retiring
    access = [x for x in lines if x["event"] == "access"]
    chats = [a for a in access if a["route"] == "chat.completions"]
    assert sorted(a["stream"] for a in chats) == [False, False, True]


async def test_a_reload_names_the_settings_that_need_a_restart_and_applies_the_rest(tmp_path, upstream):
    from proxy.reload import _needs_restart

    path = tmp_path / "ssegate.yaml"
    write_config(path, upstream, admin_key="adm-one")
    before = load_config(str(path))
    gw = await GatewayServer.start(before, config_path=str(path))
    try:
        path.write_text(path.read_text().replace("server: {", "server: {port: 8123, max_request_size: 1000, ")
                        .replace("adm-one", "adm-two") + '\ncors: {allow_origins: ["https://chat.example"]}\n')
        async with aiohttp.ClientSession() as s:
            async with s.post(gw.url + "/admin/reload", headers={"Authorization": "Bearer adm-one"}) as r:
                assert r.status == 200
            async with s.post(gw.url + "/admin/reload", headers={"Authorization": "Bearer adm-one"}) as r:
                assert r.status == 401  # the new admin key applies at once
            async with s.post(gw.url + "/admin/reload", headers={"Authorization": "Bearer adm-two"}) as r:
                assert r.status == 200
            # the size limit of the start still holds (a 1,500-byte body passes), whole or in pieces alike
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 1500}]}
            async with s.post(gw.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
        assert _needs_restart(before, load_config(str(path))) == [
            "server.port", "server.max_request_size", "cors.allow_origins"]
        assert _needs_restart(before, before) == []
    finally:
        await gw.close()


def test_serve_exits_when_its_port_is_taken(tmp_path, upstream, redis_url):
    """It used to hang: the Gateway had started (the Redis rate limiter's probe among its tasks) when binding
    failed, and nothing stopped it. It now exits at once, with one line saying why."""
    import socket
    import subprocess

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    path = tmp_path / "ssegate.yaml"
    path.write_text(textwrap.dedent(f"""\
        redis: {{url: "{redis_url}"}}
        providers:
          - {{name: up, type: openai, base_url: "{upstream.base_url}"}}
        pipeline: [{{ratelimit: {{backend: redis}}}}, router]
        """))
    try:
        done = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(path), "--port", str(port)],
                              capture_output=True, text=True, timeout=20)
    finally:
        holder.close()
    assert done.returncode == 1, done.stderr
    assert f"ssegate: cannot listen on 127.0.0.1:{port}" in done.stderr
    assert all(line.startswith(("{", "ssegate: ")) for line in done.stderr.splitlines() if line), done.stderr


def test_serve_says_in_one_line_which_plugin_cannot_start(tmp_path, upstream):
    import subprocess

    (tmp_path / "licensed.py").write_text(textwrap.dedent("""\
        from proxy import hookimpl

        class Plugin:
            @hookimpl
            def startup(self, gateway):
                raise RuntimeError("no licence key found")
        """))
    path = tmp_path / "ssegate.yaml"
    path.write_text(textwrap.dedent(f"""\
        providers:
          - {{name: up, type: openai, base_url: "{upstream.base_url}"}}
        pipeline: ["licensed:Plugin", router]
        """))
    done = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(path), "--port", "0"],
                          capture_output=True, text=True, timeout=20,
                          env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert done.returncode == 1, done.stderr
    assert "ssegate: cannot start: plugin 'licensed:Plugin' failed to start" in done.stderr, done.stderr
    assert "no licence key found" in done.stderr
    # JSON log lines (the plugin's failure, its traceback inside) and the one line: no raw traceback
    assert all(line.startswith(("{", "ssegate: ")) for line in done.stderr.splitlines() if line), done.stderr


@pytest.mark.parametrize("command", ["serve", "check-config"])
def test_what_serve_refuses_check_config_refuses_with_file_line_and_key(tmp_path, upstream, command):
    """Settings only a whole config can check (a Redis backend without redis.url, /metrics on the main port, a
    trusted proxy that is no address): ``serve`` exits 2 before anything starts, and ``check-config`` says the same."""
    import subprocess

    path = tmp_path / "ssegate.yaml"
    path.write_text(textwrap.dedent(f"""\
        server: {{port: 8123, trusted_proxies: ["10.0.0.0/8", "not-a-network"]}}
        observability: {{metrics_port: 8123}}
        providers:
          - {{name: up, type: openai, base_url: "{upstream.base_url}"}}
        pipeline:
          - ratelimit:
              backend: redis
          - router
        """))
    cluster = tmp_path / "cluster.yaml"  # a Redis Cluster's node list: one server's URL is expected
    cluster.write_text(textwrap.dedent(f"""\
        redis: {{url: "redis://127.0.0.1:7000,127.0.0.1:7001"}}
        providers: [{{name: up, type: openai, base_url: "{upstream.base_url}"}}]
        """))
    args = ["serve", "--config", str(cluster)] if command == "serve" else ["check-config", str(cluster)]
    done = subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=20)
    assert done.returncode == (2 if command == "serve" else 1), done.stdout + done.stderr
    assert f"{cluster}:1: redis.url" in done.stderr and "one server" in done.stderr
    args = ["serve", "--config", str(path)] if command == "serve" else ["check-config", str(path)]
    done = subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=20)
    out = done.stdout + done.stderr
    assert done.returncode == (2 if command == "serve" else 1), out
    assert f"{path}:7: pipeline[0].ratelimit.backend" in out and "redis.url" in out
    assert f"{path}:2: observability.metrics_port" in out
    assert f"{path}:1: server.trusted_proxies[1]" in out and "not-a-network" in out
