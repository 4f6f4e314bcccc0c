import asyncio
import contextlib
import io
from pathlib import Path
from typing import Iterator

import aiohttp
import orjson
import structlog

from proxy import log as log_module
from proxy.config.schema import LoggingConfig
from proxy.log import configure_logging


@contextlib.contextmanager
def json_logging_to(path: Path, **options: object) -> Iterator[None]:
    """JSON logs into ``path`` for the block; structlog and the fast line writers are reset after it."""
    with open(path, "w") as out:
        try:
            configure_logging(LoggingConfig(format="json", **options), out)  # type: ignore[arg-type]
            yield
        finally:
            structlog.reset_defaults()
            log_module._json_target.clear()
            log_module.restore_output()  # loggers structlog cached in the block write to stderr again


def test_json_lines_with_levels_per_logger():
    out = io.StringIO()
    try:
        configure_logging(LoggingConfig(level="info", format="json",
                                        levels={"ssegate.access": "warning", "ssegate.debuggy": "debug"}), out)
        structlog.contextvars.bind_contextvars(request_id="r-1")
        structlog.get_logger("ssegate.access").info("access", status=200)      # below its logger's level
        structlog.get_logger("ssegate.access").warning("access", status=502)
        structlog.get_logger("ssegate.gateway").debug("hidden")                # below the default level
        structlog.get_logger("ssegate.debuggy.sub").debug("shown")             # prefix rule
        structlog.get_logger("ssegate.gateway").info("shown_too")
    finally:
        structlog.contextvars.clear_contextvars()
        structlog.reset_defaults()
        log_module.restore_output()
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["event"], e["logger"]) for e in lines] == [
        ("access", "ssegate.access"), ("shown", "ssegate.debuggy.sub"), ("shown_too", "ssegate.gateway")]
    assert lines[0]["status"] == 502 and lines[0]["level"] == "warning"
    assert all(e["request_id"] == "r-1" and "timestamp" in e for e in lines)


def test_new_levels_reach_loggers_already_used():
    """A reload reconfigures logging; structlog caches a logger's set-up at its first use, so the levels must
    reach loggers used before (a module's ``log = structlog.get_logger(...)``), both ways."""
    out, later = io.StringIO(), io.StringIO()
    quiet = LoggingConfig(level="info", format="json", levels={"ssegate.thing": "warning"})
    loud = LoggingConfig(level="info", format="json", levels={"ssegate.thing": "debug"})
    try:
        configure_logging(quiet, out)
        logger = structlog.get_logger("ssegate.thing")
        logger.info("dropped_1")
        configure_logging(loud, out)
        logger.debug("kept_1")
        logger.info("kept_2")
        configure_logging(quiet, later)  # the output changes too
        logger.info("dropped_2")
        logger.warning("kept_3")
    finally:
        structlog.reset_defaults()
        log_module.restore_output()
    assert [orjson.loads(line)["event"] for line in out.getvalue().splitlines()] == ["kept_1", "kept_2"]
    assert [orjson.loads(line)["event"] for line in later.getvalue().splitlines()] == ["kept_3"]


def test_a_new_format_reaches_loggers_already_used():
    """A reload from JSON logs to console logs (and back) changes the lines of loggers structlog has cached."""
    first, second, third = io.StringIO(), io.StringIO(), io.StringIO()
    try:
        configure_logging(LoggingConfig(format="json"), first)
        logger = structlog.get_logger("ssegate.formats")
        logger.info("as_json", n=1)
        configure_logging(LoggingConfig(format="console"), second)
        logger.info("as_console", n=2)
        configure_logging(LoggingConfig(format="json"), third)
        logger.warning("as_json_again", n=3)
    finally:
        structlog.reset_defaults()
        log_module.restore_output()
    assert orjson.loads(first.getvalue())["event"] == "as_json"
    console = second.getvalue()
    assert "as_console" in console and "n=2" in console and not console.lstrip().startswith("{")
    again = orjson.loads(third.getvalue())
    assert again["event"] == "as_json_again" and again["level"] == "warning" and again["logger"] == "ssegate.formats"


async def test_access_lines_take_the_fast_json_path(tmp_path, upstream, gateway_factory):
    from proxy.testing import config_for
    from tests.helpers import CHAT, read_stream

    path = tmp_path / "ssegate.log"
    with json_logging_to(path, levels={"ssegate.forward": "error"}):
        gw = await gateway_factory(config_for(upstream))
        assert gw.current.plugin("access_log").write_bytes is not None
        await read_stream(gw.base_url + "/chat/completions", {**CHAT, "stream": True}, {"X-Request-ID": "fast-1"})
        for _ in range(40):  # bounded: lines are flushed every 0.25 s
            if "fast-1" in path.read_text():
                break
            await asyncio.sleep(0.05)
    lines = [orjson.loads(line) for line in path.read_text().splitlines()]
    access = [e for e in lines if e.get("event") == "access"]
    assert len(access) == 1
    line = access[0]
    assert (line["logger"], line["level"], line["request_id"], line["status"]) == ("ssegate.access", "info",
                                                                                    "fast-1", 200)
    assert line["timestamp"].endswith("Z") and line["completion_tokens"] == 4


async def test_fast_access_lines_follow_the_access_loggers_level(tmp_path, upstream, upstream2, gateway_factory):
    """With ``ssegate.access: warning``, the fast path writes the failed exchange's line and not the good one's."""
    from proxy.testing import Script, config_for
    from tests.helpers import CHAT

    upstream2.script = Script(status=503, error="down")
    path = tmp_path / "ssegate.log"
    with json_logging_to(path, levels={"ssegate.access": "warning", "ssegate.forward": "error"}):
        gw = await gateway_factory(config_for(upstream, upstream2))
        async with aiohttp.ClientSession() as s:
            async with s.post(gw.base_url + "/chat/completions", json=CHAT, headers={"X-Request-ID": "good"}) as r:
                assert r.status == 200
            async with s.post(gw.base_url + "/chat/completions", json={**CHAT, "model": "up1/m"},
                              headers={"X-Request-ID": "bad"}) as r:
                assert r.status == 503
        for _ in range(40):  # bounded: lines are flushed every 0.25 s
            if "bad" in path.read_text():
                break
            await asyncio.sleep(0.05)
    access = [e for e in map(orjson.loads, path.read_text().splitlines()) if e.get("event") == "access"]
    assert [(e["request_id"], e["level"], e["status"]) for e in access] == [("bad", "warning", 503)]


async def test_lines_logged_while_serving_carry_the_request_and_trace_ids(tmp_path, ssegate_gateway):
    """The handler sets the request context once; every structlog line of that request carries both ids."""
    from proxy import hookimpl

    class LogsInAHook:
        @hookimpl
        def check_request(self, exchange):
            structlog.get_logger("ssegate.test.hook").info("in_check_request")

    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    path = tmp_path / "ssegate.log"
    with json_logging_to(path):
        gw = await ssegate_gateway(pipeline=[LogsInAHook(), "router"])
        answer = await gw.chat("hi", headers={"X-Request-ID": "ctx-1",
                                              "traceparent": f"00-{trace}-00f067aa0ba902b7-01"})
        assert answer == "Hello, world!"
        structlog.get_logger("ssegate.test.hook").info("outside_any_request")
    lines = [orjson.loads(line) for line in path.read_text().splitlines()]
    inside = [e for e in lines if e.get("event") == "in_check_request"]
    assert len(inside) == 1 and (inside[0]["request_id"], inside[0]["trace_id"]) == ("ctx-1", trace)
    outside = [e for e in lines if e.get("event") == "outside_any_request"]
    assert len(outside) == 1 and "request_id" not in outside[0]


async def test_access_lines_flush_at_once_when_quiet_and_together_when_busy(tmp_path, upstream, gateway_factory):
    """No timer ticks for the access log: the first line after a quiet spell is flushed as it is written; a line
    within FLUSH_INTERVAL of a flush waits for one timer, which is not armed again once it has flushed."""
    from proxy.testing import config_for, make_exchange

    path = tmp_path / "ssegate.log"
    with json_logging_to(path, levels={"ssegate.forward": "error"}):
        gw = await gateway_factory(config_for(upstream))
        plugin = gw.current.plugin("access_log")
        assert plugin._flush_timer is None
        first, second = make_exchange(request_id="quiet-1"), make_exchange(request_id="busy-2")
        first.status = second.status = 200
        plugin.exchange_done(first)
        assert "quiet-1" in path.read_text() and plugin._flush_timer is None
        plugin.exchange_done(second)
        assert "busy-2" not in path.read_text() and plugin._flush_timer is not None
        for _ in range(40):  # bounded: the timer is due FLUSH_INTERVAL (0.25 s) after the first flush
            if "busy-2" in path.read_text():
                break
            await asyncio.sleep(0.05)
        assert "busy-2" in path.read_text() and plugin._flush_timer is None
