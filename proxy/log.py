"""structlog setup: JSON lines in production, a readable console in development, levels per logger.

Loggers are named (``structlog.get_logger("ssegate.access")``); ``logging.levels`` sets a level per name or
name prefix (``ssegate.access: warning`` silences access lines, ``ssegate: debug`` opens everything of ours),
for structlog loggers and standard-library ones (``aiohttp``, ``redis``) alike.
"""
from __future__ import annotations

import io
import logging
import os
import sys
import time
from contextvars import ContextVar
from typing import Any, Callable, TextIO

import orjson
import structlog

from .config.schema import LoggingConfig

__all__ = ["configure_logging", "restore_output", "level_filter", "line_sink", "LINE_OPTIONS", "flush_lines",
           "request_context", "add_request_context"]

#: ``(request_id, trace_id)`` of the request the current task serves (set once per request by the handler:
#: one context variable, where structlog's ``bind_contextvars`` sets one per key).
request_context: ContextVar[tuple[str, str] | None] = ContextVar("ssegate_request", default=None)


def add_request_context(logger: Any, method: str, event: Any) -> Any:
    """structlog processor: every line logged while serving a request carries its ``request_id`` and
    ``trace_id``."""
    ctx = request_context.get()
    if ctx is not None:
        event.setdefault("request_id", ctx[0])
        event.setdefault("trace_id", ctx[1])
    return event

_LEVELS = {"debug": 10, "info": 20, "msg": 20, "warning": 30, "warn": 30, "error": 40, "exception": 40,
           "critical": 50, "fatal": 50}


class _Output:
    """Where loggers write: the stream of the latest :func:`configure_logging`. structlog keeps the logger it made
    for a name at its first use (``cache_logger_on_first_use``); writing through this object, such a logger
    follows a reload's reconfiguration (and a test's output) instead of the stream of its first use."""

    def __init__(self) -> None:
        self.text: TextIO = sys.stderr
        self.binary: Any = getattr(sys.stderr, "buffer", None)

    def point_at(self, file: TextIO) -> None:
        self.text, self.binary = file, getattr(file, "buffer", None)


_OUTPUT = _Output()


class _NamedLogger:
    """The logger structlog wraps: it remembers its name (processors read ``logger.name``) and writes a rendered
    line, text (console, JSON to a text stream) or bytes (JSON rendered by orjson), to the current output. One class
    for both: a logger structlog cached under one ``logging.format`` writes the lines of the next."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def msg(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            binary = _OUTPUT.binary
            if binary is not None:
                binary.write(message + b"\n")
                binary.flush()
                return
            message = message.decode("utf-8", "replace")
        text = _OUTPUT.text
        text.write(message + "\n")
        text.flush()

    log = debug = info = warn = warning = error = err = critical = fatal = exception = failure = msg


def restore_output() -> None:
    """Point every logger back at ``sys.stderr`` (tests, after logging to a file they close)."""
    _OUTPUT.point_at(sys.stderr)


def _create_logger(*args: Any) -> _NamedLogger:
    return _NamedLogger(str(args[0]) if args else "")


class _Chain:
    """The processors of the latest :func:`configure_logging`. structlog gives every logger the processor list of
    its first use, for good (``cache_logger_on_first_use``); that list holds only :func:`_run_chain`, which runs the
    current processors: a reload's format, levels and output reach every logger, used before or not."""

    processors: tuple[Any, ...] = ()


def _run_chain(logger: Any, method: str, event: Any) -> Any:
    for processor in _Chain.processors:
        event = processor(logger, method, event)
    return event


class _Levels:
    """The level of each logger name: ``default``, or that of its longest prefix in ``levels``."""

    def __init__(self, default: int, levels: dict[str, int]) -> None:
        self.set(default, levels)

    def set(self, default: int, levels: dict[str, int]) -> None:
        self.default, self.levels = default, dict(levels)
        self.resolved: dict[str, int] = {}

    def threshold(self, name: str) -> int:
        found = self.resolved.get(name)
        if found is None:
            found, best = self.default, -1
            for prefix, level in self.levels.items():
                if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                    found, best = level, len(prefix)
            self.resolved[name] = found
        return found


def level_filter(default: int, levels: dict[str, int], state: _Levels | None = None) -> Any:
    """A processor adding ``logger`` to each event and dropping events below their logger's level (read from
    ``state`` at each event, so that changing it reaches loggers structlog has already cached)."""
    levels_state = state if state is not None else _Levels(default, levels)
    threshold = levels_state.threshold

    def process(logger: Any, method: str, event: Any) -> Any:
        name = getattr(logger, "name", "") or ""
        if _LEVELS.get(method, 20) < threshold(name):
            raise structlog.DropEvent
        if name:
            event["logger"] = name
        return event

    process.threshold = threshold  # type: ignore[attr-defined]
    return process


#: The process's levels (``logging.level`` and ``logging.levels``), changed in place by each
#: :func:`configure_logging`; the level filter and the access log's fast path read them.
_PROCESS_LEVELS = _Levels(logging.INFO, {})


def _timestamper() -> Any:
    """ISO-8601 UTC timestamps with microseconds, the date-time part formatted once per second (structlog's
    TimeStamper costs ~8 µs an event, more than the rest of an access line)."""
    cache: list[Any] = [-1, ""]

    def stamp(logger: Any, method: str, event: Any) -> Any:
        now = time.time()
        second = int(now)
        if second != cache[0]:
            cache[0], cache[1] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event["timestamp"] = "%s.%06dZ" % (cache[1], (now - second) * 1e6)
        return event

    return stamp


_json_target: dict[str, Any] = {}


def line_sink(name: str) -> tuple[Callable[[bytes], Any], int] | None:
    """The fast JSON path for one hot line per exchange (the access log): ``(write_bytes, threshold)`` for
    logger ``name`` when JSON logging to a binary stream is configured, else None (console logs, or structlog
    left to tests' ``capture_logs``: log through structlog then). The caller builds the whole object (``event``,
    ``level``, ``logger`` and ``timestamp`` included), checks its level against ``threshold`` (10 debug ... 50
    critical) and writes ``orjson.dumps(fields, option=LINE_OPTIONS)``, about a fifth of structlog's cost.
    Buffered: flushed by :func:`flush_lines`."""
    target = _json_target.get("stream")
    if target is None:
        return None
    return target.write, _json_target["threshold"](name)


#: orjson options of a line: a newline at the end, ``datetime`` values in UTC written with ``Z``.
LINE_OPTIONS = orjson.OPT_APPEND_NEWLINE | orjson.OPT_UTC_Z


def flush_lines() -> None:
    """Flush what the fast line writers buffered (their owner calls this a few times a second)."""
    stream = _json_target.get("stream")
    if stream is not None:
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def _buffered(binary: Any) -> Any:
    """The line writers' stream: ``binary`` itself when it buffers, else a buffered writer of its own on a
    duplicate of its descriptor. With ``PYTHONUNBUFFERED=1`` (usual in containers) ``sys.stderr.buffer`` is a
    raw ``FileIO``, and a write per access line would be a syscall per request."""
    if not isinstance(binary, io.RawIOBase):
        return binary
    try:
        raw = io.FileIO(os.dup(binary.fileno()), "wb", closefd=True)
    except (OSError, ValueError, io.UnsupportedOperation):
        return binary
    return io.BufferedWriter(raw, buffer_size=1 << 16)


def configure_logging(config: LoggingConfig, file: TextIO | None = None) -> None:
    out = file or sys.stderr
    fmt = config.format
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    default = getattr(logging, config.level.upper(), logging.INFO)
    levels = {name: getattr(logging, lvl.upper(), logging.INFO) for name, lvl in config.levels.items()}
    binary = fmt == "json" and getattr(out, "buffer", None) is not None
    if fmt == "console":
        renderer: Any = structlog.dev.ConsoleRenderer(colors=out.isatty())  # no escape codes in a file
    elif binary:
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
    else:
        renderer = structlog.processors.JSONRenderer(serializer=lambda obj, **kw: orjson.dumps(obj, **kw).decode())
    _PROCESS_LEVELS.set(default, levels)
    _OUTPUT.point_at(out)
    filter_ = level_filter(default, levels, _PROCESS_LEVELS)
    flush_lines()
    previous, previous_source = _json_target.get("stream"), _json_target.get("source")
    _json_target.clear()
    if binary:
        source = out.buffer
        # The same output keeps its writer (a reload reconfigures logging): a new one per call would leave the
        # old one, still held by access-log plugins, unflushed (lines lost) and its descriptor open.
        stream = previous if previous is not None and previous_source is source else _buffered(source)
        _json_target.update(stream=stream, source=source, threshold=filter_.threshold)  # type: ignore[attr-defined]
    _Chain.processors = (
        filter_,
        structlog.contextvars.merge_contextvars,
        add_request_context,
        structlog.processors.add_log_level,
        _timestamper(),
        structlog.processors.format_exc_info if fmt == "json" else structlog.dev.set_exc_info,
        renderer,
    )
    structlog.configure(
        processors=[_run_chain],
        # Every method reaches the processors, where the level filter decides (a cached logger must see a reload's
        # levels). Debug calls are rare, so letting them through to the filter costs nothing measurable.
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=_create_logger,
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=default, stream=out, format="%(levelname)s %(name)s %(message)s", force=True)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
