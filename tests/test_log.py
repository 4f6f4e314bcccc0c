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
