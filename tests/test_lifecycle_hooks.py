"""The process-lifecycle and routing hooks through third-party plugins: ``startup``, ``shutdown``,
``register_metrics`` and ``select_route``, each implemented by a plain class in this file and loaded into a
real gateway (as an object, or by dotted path from a config file so that a reload builds new instances)."""
from __future__ import annotations

import asyncio
import socket
import sys
import textwrap
import time

import aiohttp
import attrs
import openai
import pytest
from structlog.testing import capture_logs

from proxy import GatewayError, Outcome, Route, hookimpl
from proxy.config import load_config
from proxy.config.schema import PipelineEntry
from proxy.gateway import Gateway
from proxy.metrics import counter
from proxy.testing import GatewayServer, Script, config_for
from proxy.web_app import create_app, start_server
from tests.conftest import openai_client, spawn, stop
from tests.helpers import CHAT, content_of, read_stream

STREAM = {**CHAT, "stream": True}
MESSAGES = CHAT["messages"]
ADMIN = {"Authorization": "Bearer adm-secret"}
#: Key in ``gateway.process_state`` (handed from each Gateway to its successor on reload) under which the
#: plugins below that are loaded by dotted path list their instances, so a test can find every generation.
INSTANCES = "test_lifecycle_hooks.instances"


def dotted(cls: type) -> str:
    """The pipeline name that imports ``cls`` from this very module object (whatever name pytest gave it)."""
    return f"{__name__}:{cls.__qualname__}"


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of a Prometheus text exposition, None if absent."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            series, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in series for k, v in labels.items()):
                return float(value)
    return None


async def scrape(url: str) -> str:
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/metrics") as r:
            assert r.status == 200
            return await r.text()


async def reload(server: GatewayServer) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(server.url + "/admin/reload", headers=ADMIN) as r:
            assert r.status == 200, await r.text()


async def eventually(predicate, what: str, tries: int = 150) -> None:
    for _ in range(tries):  # bounded: 3 s
        if predicate():
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


def write_config(path, upstream, pipeline: list[str | dict]) -> None:
    lines = "\n".join(f"  - {p!r}" if isinstance(p, str) else
                      f"  - {{{next(iter(p))!r}: {p[next(iter(p))]!r}}}" for p in pipeline)
    path.write_text(textwrap.dedent(f"""\
        server: {{admin_key: adm-secret}}
        providers:
          - name: main
            type: openai
            base_url: {upstream.base_url}
        """) + "pipeline:\n" + lines + "\n")


# -- startup ----------------------------------------------------------------------------------------------

@attrs.frozen
class GreeterConfig:
    greeting: str = "hello"


class SyncStarter:
    """Sync ``startup``: reads the gateway's config and its own settings, once, before any request."""

    Config = GreeterConfig

    def __init__(self, config: GreeterConfig) -> None:
        self.config = config
        self.log: list[tuple] = []

    @hookimpl
    def startup(self, gateway):
        self.log.append(("startup", gateway.plugin_config(dotted(SyncStarter)).greeting,
                         [p.name for p in gateway.config.providers], sorted(gateway.providers)))

    @hookimpl
    def check_request(self, exchange):
        self.log.append(("request", exchange.model))


class AsyncStarter:
    """Async ``startup`` that needs a real await (a pool opening); requests must see it finished."""

    def __init__(self) -> None:
        self.config = {"pool_size": 3}
        self.starts = 0
        self.pool: list[int] | None = None
        self.seen_pool: list[list[int] | None] = []

    @hookimpl
    async def startup(self, gateway):
        self.starts += 1
        await asyncio.sleep(0.05)
        self.pool = list(range(gateway.plugin_config("pool")["pool_size"]))

    @hookimpl
    async def check_request(self, exchange):
        self.seen_pool.append(self.pool)


async def test_sync_and_async_startup_run_once_before_the_first_request(upstream, upstream2):
    pool = AsyncStarter()
    config = config_for(upstream, upstream2, pipeline=[
        PipelineEntry(dotted(SyncStarter), {"greeting": "bonjour"}), "pool", "router"])
    server = await GatewayServer.start(config, plugins={"pool": pool})
    try:
        sync = server.gateway.plugin(dotted(SyncStarter))
        # Both ran while the server was being set up: before it accepted a connection, and only once.
        assert sync.log == [("startup", "bonjour", ["up0", "up1"], ["up0", "up1"])]
        assert pool.starts == 1 and pool.pool == [0, 1, 2]
        client = openai_client(server.base_url)
        for model in ("m1", "m2"):
            answer = await client.chat.completions.create(model=model, messages=MESSAGES)
            assert answer.choices[0].message.content == "Hello, world!"
        stream = await client.chat.completions.create(model="m3", messages=MESSAGES, stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "Hello, world!"
        await client.close()
        assert sync.log[1:] == [("request", "m1"), ("request", "m2"), ("request", "m3")]
        assert [e[0] for e in sync.log].count("startup") == 1
        assert pool.starts == 1 and pool.seen_pool == [[0, 1, 2]] * 3
    finally:
        await server.close()


class BrokenStartup:
    """Refuses to start (e.g. a missing file); requests must never reach it."""

    def __init__(self) -> None:
        self.requests = 0

    @hookimpl
    async def startup(self, gateway):
        await asyncio.sleep(0)
        raise FileNotFoundError("rules.yaml")

    @hookimpl
    def check_request(self, exchange):
        self.requests += 1


class Later:
    def __init__(self) -> None:
        self.started = False
        self.shut_down = False

    @hookimpl
    def startup(self, gateway):
        self.started = True

    @hookimpl
    def shutdown(self, gateway):
        self.shut_down = True


class EarlierWithShutdown:
    def __init__(self) -> None:
        self.shut_down = 0

    @hookimpl
    def shutdown(self, gateway):
        self.shut_down += 1


class RefusesWithGatewayError:
    @hookimpl
    def startup(self, gateway):
        raise GatewayError(500, "no licence file", code="licence_missing")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_an_exception_in_startup_aborts_startup_naming_the_plugin(upstream):
    earlier, broken, later = EarlierWithShutdown(), BrokenStartup(), Later()
    config = config_for(upstream, pipeline=["earlier", "broken", "later", "router"])
    gateway = Gateway(config, plugin_objects={"earlier": earlier, "broken": broken, "later": later})
    app = create_app(gateway)
    port = free_port()
    with pytest.raises(GatewayError) as info:
        await start_server(app, "127.0.0.1", port)
    assert "'broken'" in str(info.value) and "rules.yaml" in str(info.value)
    assert info.value.code == "plugin_startup_failed"
    assert not later.started  # startup stopped at the failing plugin
    # Nothing serves: the listening socket was never opened.
    with pytest.raises(aiohttp.ClientConnectorError):
        async with aiohttp.ClientSession() as s:
            await s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT)
    assert broken.requests == 0 and upstream.requests == []
    # What start() had opened is closed again: provider pools, the watchdog; plugins reached before the
    # failing one are shut down, the one that failed and those never started are not.
    assert all(p._session is None for p in gateway.providers.values())
    assert not gateway.watchdog.running
    assert earlier.shut_down == 1 and not later.shut_down


async def test_a_gateway_error_in_startup_also_names_the_plugin(upstream):
    gateway = Gateway(config_for(upstream, pipeline=["licensed", "router"]),
                      plugin_objects={"licensed": RefusesWithGatewayError()})
    with pytest.raises(GatewayError) as info:
        await gateway.start()
    assert info.value.code == "plugin_startup_failed"
    assert "plugin 'licensed' failed to start: no licence file" in str(info.value)


async def test_ssegate_serve_exits_when_a_plugin_fails_to_start(tmp_path, upstream):
    path = tmp_path / "ssegate.yaml"
    write_config(path, upstream, ["tests.test_lifecycle_hooks:BrokenStartup", "router"])
    with pytest.raises(RuntimeError) as info:
        proc, _ = spawn([sys.executable, "-m", "proxy", "serve", "--config", str(path), "--port", "0"],
                        "ssegate listening on", timeout=30)
        stop(proc)
    message = str(info.value)
    assert "exited" in message and "did not become ready" not in message
    assert "tests.test_lifecycle_hooks:BrokenStartup" in message and "failed to start" in message
    assert upstream.requests == []


# -- shutdown ---------------------------------------------------------------------------------------------

class Closer:
    def __init__(self, name: str, log: list[str], fail: bool = False) -> None:
        self.name, self.log, self.fail = name, log, fail

    @hookimpl
    def shutdown(self, gateway):
        self.log.append(f"{self.name}.shutdown({gateway.in_flight})")
        if self.fail:
            raise RuntimeError("cannot flush")


class AsyncCloser:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    @hookimpl
    async def shutdown(self, gateway):
        await asyncio.sleep(0.01)
        self.log.append("async.shutdown")


async def test_shutdown_runs_once_when_the_gateway_closes_even_if_one_fails(upstream):
    log: list[str] = []
    config = config_for(upstream, pipeline=["first", "broken", "async", "router"])
    server = await GatewayServer.start(config, plugins={
        "first": Closer("first", log), "broken": Closer("broken", log, fail=True), "async": AsyncCloser(log)})
    client = openai_client(server.base_url)
    answer = await client.chat.completions.create(model="m", messages=MESSAGES)
    assert answer.choices[0].message.content == "Hello, world!"
    await client.close()
    assert log == []  # not per request
    with capture_logs() as logs:
        await server.close()
    assert log == ["first.shutdown(0)", "broken.shutdown(0)", "async.shutdown"]
    failed = [e for e in logs if e.get("event") == "plugin_failed"]
    assert len(failed) == 1
    assert failed[0]["plugin"] == "broken" and failed[0]["hook"] == "shutdown"
    assert "cannot flush" in failed[0]["error"]


class Generation:
    """Loaded by dotted path from a config file, so each reload builds a new instance; records every
    lifecycle call on itself and lists itself in ``gateway.process_state`` (which a reload hands on)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.registry = None

    @hookimpl
    def register_metrics(self, registry):
        self.calls.append("register_metrics")
        self.registry = registry

    @hookimpl
    async def startup(self, gateway):
        self.calls.append("startup")
        self.gateway = gateway
        gateway.process_state.setdefault(INSTANCES, []).append(self)

    @hookimpl
    def exchange_done(self, exchange):
        self.calls.append("exchange_done")

    @hookimpl
    async def shutdown(self, gateway):
        self.shutdown_gateway = gateway
        self.calls.append(f"shutdown(in_flight={gateway.in_flight})")


async def test_shutdown_runs_when_a_reload_retires_the_instance(tmp_path, upstream):
    upstream.script = Script(texts=[f"t{i} " for i in range(6)], delay=0.1)
    path = tmp_path / "ssegate.yaml"
    write_config(path, upstream, [dotted(Generation), "router"])
    server = await GatewayServer.start(load_config(str(path)), config_path=str(path))
    try:
        first = server.current.process_state[INSTANCES][0]
        assert first.calls == ["register_metrics", "startup"]
        live = asyncio.create_task(read_stream(server.base_url + "/chat/completions", STREAM))
        await eventually(lambda: upstream.in_flight == 1, "the stream to start")
        await reload(server)
        instances = server.current.process_state[INSTANCES]
        assert len(instances) == 2 and instances[0] is first
        second = instances[1]
        assert second is not first and second.calls == ["register_metrics", "startup"]
        # The old instance keeps serving its live stream: not shut down under it.
        await asyncio.sleep(0.1)
        if not live.done():
            assert first.calls == ["register_metrics", "startup"]
        status, _, events = await asyncio.wait_for(live, 10)
        assert status == 200 and content_of(events) == "".join(f"t{i} " for i in range(6))
        await eventually(lambda: len(first.calls) == 4, "the retired instance's shutdown")
        # Shut down after its last exchange ended, with the gateway it started with.
        assert first.calls == ["register_metrics", "startup", "exchange_done", "shutdown(in_flight=0)"]
        assert first.shutdown_gateway is first.gateway is server.gateway
        assert second.calls == ["register_metrics", "startup"]
    finally:
        await server.close()
    assert first.calls.count("shutdown(in_flight=0)") == 1  # once: closing the server does not repeat it
    assert second.calls == ["register_metrics", "startup", "shutdown(in_flight=0)"]
    assert second.shutdown_gateway is second.gateway is not first.gateway
    assert second.registry is first.registry is server.gateway.registry


# -- register_metrics -------------------------------------------------------------------------------------

class RequestCounter:
    """A third-party plugin's own Prometheus counter, updated once per exchange."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    async def register_metrics(self, registry):
        await asyncio.sleep(0)
        self.calls.append("register_metrics")
        self.registry = registry
        self.counter = counter(registry, "lifecycle_test_exchanges_total", "Exchanges seen by the test plugin.")

    @hookimpl
    def startup(self, gateway):
        self.calls.append("startup")
        assert self.registry is gateway.registry
        gateway.process_state.setdefault(INSTANCES, []).append(self)

    @hookimpl
    def exchange_done(self, exchange):
        self.counter.inc({"outcome": exchange.outcome, "stream": str(exchange.stream).lower()})


async def test_a_plugin_counter_appears_in_metrics_and_survives_a_reload(tmp_path, upstream):
    path = tmp_path / "ssegate.yaml"
    write_config(path, upstream, [dotted(RequestCounter), "router"])
    server = await GatewayServer.start(load_config(str(path)), config_path=str(path))
    try:
        first = server.current.process_state[INSTANCES][0]
        assert first.calls == ["register_metrics", "startup"]
        assert first.registry is server.gateway.registry
        client = openai_client(server.base_url)
        for _ in range(3):
            await client.chat.completions.create(model="m", messages=MESSAGES)
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        _ = [c async for c in stream]
        async with aiohttp.ClientSession() as s:  # rejected by validation: exchange_done still counts it
            async with s.post(server.base_url + "/chat/completions", json={"model": "m"}) as r:
                assert r.status == 400
        await asyncio.sleep(0.05)
        text = await scrape(server.url)
        assert "# HELP lifecycle_test_exchanges_total Exchanges seen by the test plugin." in text
        assert "# TYPE lifecycle_test_exchanges_total counter" in text
        assert sample(text, "lifecycle_test_exchanges_total", outcome=Outcome.OK, stream="false") == 3
        assert sample(text, "lifecycle_test_exchanges_total", outcome=Outcome.OK, stream="true") == 1
        assert sample(text, "lifecycle_test_exchanges_total", outcome=Outcome.REJECTED) == 1

        await reload(server)
        second = server.current.process_state[INSTANCES][1]
        assert second is not first and second.calls == ["register_metrics", "startup"]
        assert second.registry is first.registry and second.counter is first.counter
        for _ in range(2):
            await client.chat.completions.create(model="m", messages=MESSAGES)
        await client.close()
        await asyncio.sleep(0.05)
        text = await scrape(server.url)
        assert sample(text, "lifecycle_test_exchanges_total", outcome=Outcome.OK, stream="false") == 5
        assert sample(text, "lifecycle_test_exchanges_total", outcome=Outcome.REJECTED) == 1
        assert text.count("# TYPE lifecycle_test_exchanges_total counter") == 1
    finally:
        await server.close()


async def test_process_start_time_is_the_process_start_and_survives_a_reload(tmp_path, upstream):
    test_started = time.time()
    path = tmp_path / "ssegate.yaml"
    write_config(path, upstream, ["router"])
    server = await GatewayServer.start(load_config(str(path)), config_path=str(path))
    try:
        before = sample(await scrape(server.url), "process_start_time_seconds")
        assert before is not None
        # The process (pytest) started before this test, and certainly not in the future.
        assert before < test_started
        await asyncio.sleep(0.05)
        await reload(server)
        assert server.current is not server.gateway
        after = sample(await scrape(server.url), "process_start_time_seconds")
        assert after == before
    finally:
        await server.close()


# -- select_route -----------------------------------------------------------------------------------------

class Redirect:
    """Sends every request to the second upstream under another model name (async implementation)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    @hookimpl
    async def select_route(self, exchange):
        self.seen.append(exchange.model)
        return [Route("up1", f"{exchange.model}-renamed")]


async def test_a_custom_router_before_router_wins(upstream, upstream2):
    redirect = Redirect()
    server = await GatewayServer.start(config_for(upstream, upstream2, pipeline=["redirect", "router"]),
                                       plugins={"redirect": redirect})
    try:
        client = openai_client(server.base_url)
        raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
        assert raw.headers["x-ssegate-provider"] == "up1"
        assert raw.parse().choices[0].message.content == "Hello, world!"
        stream = await client.chat.completions.create(model="other", messages=MESSAGES, stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "Hello, world!"
        await client.close()
        assert redirect.seen == ["gpt-4o-mini", "other"]
        assert [r["model"] for r in upstream2.requests] == ["gpt-4o-mini-renamed", "other-renamed"]
        assert upstream.requests == []  # the built-in router (up0 first) was never asked
    finally:
        await server.close()


class Gatekeeper:
    """``[]`` for models nobody may use, None (no opinion) for the rest; records what the exchange got."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.done: list = []

    @hookimpl
    def select_route(self, exchange):
        self.asked.append(exchange.model)
        if exchange.model.startswith("retired-"):
            return []
        return None

    @hookimpl
    def exchange_done(self, exchange):
        self.done.append((exchange.model, exchange.status, exchange.provider, list(exchange.routes or ())))


async def test_an_empty_route_list_is_a_404_model_not_found(upstream):
    keeper = Gatekeeper()
    server = await GatewayServer.start(config_for(upstream, pipeline=["keeper", "router"]),
                                       plugins={"keeper": keeper})
    try:
        client = openai_client(server.base_url)
        with pytest.raises(openai.NotFoundError) as info:
            await client.chat.completions.create(model="retired-gpt-3", messages=MESSAGES)
        assert info.value.status_code == 404
        assert info.value.code == "model_not_found" and info.value.param == "model"
        assert info.value.type == "invalid_request_error"
        assert "retired-gpt-3" in info.value.message
        with pytest.raises(openai.NotFoundError):
            stream = await client.chat.completions.create(model="retired-x", messages=MESSAGES, stream=True)
            _ = [c async for c in stream]
        await client.close()
        assert upstream.requests == []  # the router after it ([] is a result, not "no opinion")
        await asyncio.sleep(0.05)
        assert [(m, s, p) for m, s, p, _ in keeper.done] == [("retired-gpt-3", 404, None), ("retired-x", 404, None)]
    finally:
        await server.close()


async def test_none_leaves_the_decision_to_the_builtin_router(upstream, upstream2):
    keeper = Gatekeeper()
    server = await GatewayServer.start(config_for(upstream, upstream2, pipeline=["keeper", "router"]),
                                       plugins={"keeper": keeper})
    try:
        client = openai_client(server.base_url)
        raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
        assert raw.headers["x-ssegate-provider"] == "up0"  # the router's choice: priority 1
        await client.close()
        await asyncio.sleep(0.05)
        assert keeper.asked == ["gpt-4o-mini"]
        assert keeper.done[0][3] == [Route("up0", "gpt-4o-mini"), Route("up1", "gpt-4o-mini")]
        assert [r["model"] for r in upstream.requests] == ["gpt-4o-mini"] and upstream2.requests == []
    finally:
        await server.close()


class Ordered:
    """Tries the second upstream first, then the first one."""

    def __init__(self) -> None:
        self.attempts: list = []

    @hookimpl
    def select_route(self, exchange):
        return [Route("up1", "primary-model"), Route("up0", "backup-model")]

    @hookimpl
    def exchange_done(self, exchange):
        self.attempts.append((exchange.provider, exchange.upstream_model,
                              [(a["provider"], a.get("error")) for a in exchange.attempts]))


@pytest.mark.parametrize("stream", [False, True])
async def test_routes_are_tried_in_order_falling_back_on_503(upstream, upstream2, stream):
    upstream2.script = Script(status=503, error="overloaded")
    upstream.script = Script(texts=["from ", "backup"])
    ordered = Ordered()
    server = await GatewayServer.start(config_for(upstream, upstream2, pipeline=["ordered", "router"]),
                                       plugins={"ordered": ordered})
    try:
        client = openai_client(server.base_url)
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES, stream=stream)
        assert raw.headers["x-ssegate-provider"] == "up0"
        if stream:
            text = "".join([c.choices[0].delta.content or "" async for c in raw.parse() if c.choices])
        else:
            text = raw.parse().choices[0].message.content
        assert text == "from backup"
        await client.close()
        assert [r["model"] for r in upstream2.requests] == ["primary-model"]  # tried first, once
        assert [r["model"] for r in upstream.requests] == ["backup-model"]
        await eventually(lambda: ordered.attempts, "exchange_done")
        provider, model, attempts = ordered.attempts[0]
        assert (provider, model) == ("up0", "backup-model")
        assert [p for p, _ in attempts] == ["up1", "up0"] and attempts[0][1] is not None and attempts[1][1] is None
    finally:
        await server.close()
