import asyncio
import io

import orjson
import structlog

from proxy.config.schema import LoggingConfig
from proxy.log import configure_logging


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
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["event"], e["logger"]) for e in lines] == [
        ("access", "ssegate.access"), ("shown", "ssegate.debuggy.sub"), ("shown_too", "ssegate.gateway")]
    assert lines[0]["status"] == 502 and lines[0]["level"] == "warning"
    assert all(e["request_id"] == "r-1" and "timestamp" in e for e in lines)


async def test_access_lines_take_the_fast_json_path(tmp_path, upstream, gateway_factory):
    from proxy import log as log_module
    from proxy.testing import config_for
    from tests.helpers import CHAT, read_stream

    path = tmp_path / "ssegate.log"
    with open(path, "w") as out:
        try:
            configure_logging(LoggingConfig(format="json", levels={"ssegate.forward": "error"}), out)
            gw = await gateway_factory(config_for(upstream))
            assert gw.current.plugin("access_log").write is not None
            await read_stream(gw.base_url + "/chat/completions", {**CHAT, "stream": True},
                              {"X-Request-ID": "fast-1"})
            for _ in range(40):  # bounded: lines are flushed every 0.25 s
                if "fast-1" in path.read_text():
                    break
                await asyncio.sleep(0.05)
        finally:
            structlog.reset_defaults()
            log_module._json_target.clear()
            log_module._line_writers.clear()
    lines = [orjson.loads(line) for line in path.read_text().splitlines()]
    access = [e for e in lines if e.get("event") == "access"]
    assert len(access) == 1
    line = access[0]
    assert (line["logger"], line["level"], line["request_id"], line["status"]) == ("ssegate.access", "info",
                                                                                    "fast-1", 200)
    assert line["timestamp"].endswith("Z") and line["completion_tokens"] == 4
