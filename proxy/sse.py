"""Server-Sent Events: an incremental parser for upstream bytes and the :class:`Chunk` plugins see.

The parser is the per-chunk hot path. It splits whatever TCP chunking the upstream produced into complete
events without buffering more than one partial event, and it does no JSON work: a :class:`Chunk`'s JSON is
parsed once, lazily, the first time a plugin reads :attr:`Chunk.json`.
"""
from __future__ import annotations

from typing import Any

import orjson

__all__ = ["SSEParser", "Chunk", "DONE", "encode_event", "comment"]

#: The raw terminal event of an OpenAI stream (without its blank-line terminator).
DONE = b"data: [DONE]"
_NL2 = b"\n\n"


class SSEParser:
    """Split a byte stream into raw SSE events (each without its terminating blank line).

    Accepts ``\\n``, ``\\r\\n`` and ``\\r`` line endings in any mix and any split across ``feed`` calls;
    events come out with ``\\n`` line endings. Empty events (extra blank lines) are skipped.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        prev = self._buf
        if not prev and b"\r" not in data:
            # The common read: no partial event before it, LF line ends. One split; the blank-line check
            # looks at the (usually one) event instead of scanning the data again.
            parts = data.split(_NL2)
            self._buf = parts.pop()
            for part in parts:
                if not part or part[0] == 10:  # an extra blank line (10 is "\n"): the general path drops it
                    return [p.lstrip(b"\n") for p in parts if p.strip(b"\n")]
            return parts
        buf = prev + data if prev else data
        if b"\r" in data or prev[-1:] == b"\r":
            # Keep a trailing CR: it may be the first half of a CRLF split across reads.
            tail = b""
            if buf.endswith(b"\r"):
                buf, tail = buf[:-1], b"\r"
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            parts = buf.split(_NL2)
            rest = parts.pop() + tail
        else:
            parts = buf.split(_NL2)
            rest = parts.pop()
        self._buf = rest
        if buf[:1] == b"\n" or b"\n\n\n" in buf:
            # Extra blank lines between events: drop the empty events they make.
            parts = [p.lstrip(b"\n") for p in parts if p.strip(b"\n")]
        return parts

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet terminated (non-empty when a stream ends mid-event)."""
        return self._buf


def encode_event(data: bytes | str, event: str | None = None) -> bytes:
    """Build a raw event (without terminator) from a data payload; multi-line data becomes several fields."""
    if isinstance(data, str):
        data = data.encode()
    if b"\n" in data:
        body = b"\n".join(b"data: " + line for line in data.split(b"\n"))
    else:
        body = b"data: " + data
    if event:
        return b"event: " + event.encode() + b"\n" + body
    return body


def comment(text: str = "keepalive") -> bytes:
    """A complete SSE comment, terminator included (used for keepalives)."""
    return b": " + text.encode() + b"\n\n"


class Chunk:
    """One SSE event of a live stream, as handed to ``on_chunk`` hooks.

    ``raw`` is the event exactly as it will be written (without the blank-line terminator). ``data``,
    ``event`` and ``json`` are views computed on first access. To change what the client receives, call
    :meth:`set_json` or :meth:`set_raw`; mutating the dict returned by ``json`` alone changes nothing.
    """

    __slots__ = ("raw", "_data", "_json", "_parsed")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._data: str | None = None
        self._json: Any = None
        self._parsed = False

    @classmethod
    def from_json(cls, obj: Any, event: str | None = None) -> "Chunk":
        chunk = cls(encode_event(orjson.dumps(obj), event))
        chunk._json, chunk._parsed = obj, True
        return chunk

    @property
    def data(self) -> str:
        """The event's data: its ``data:`` fields joined with newlines (``""`` for comment-only events)."""
        if self._data is None:
            lines = []
            for line in self.raw.split(b"\n"):
                if line.startswith(b"data:"):
                    value = line[5:]
                    lines.append(value[1:] if value[:1] == b" " else value)
            self._data = b"\n".join(lines).decode("utf-8", "replace")
        return self._data

    @property
    def event(self) -> str | None:
        """The ``event:`` field, or None (OpenAI streams carry none; Anthropic streams do)."""
        for line in self.raw.split(b"\n"):
            if line.startswith(b"event:"):
                return line[6:].strip().decode()
        return None

    @property
    def is_done(self) -> bool:
        """True for the terminal ``data: [DONE]`` event."""
        return self.raw == DONE or self.data == "[DONE]"

    @property
    def is_comment(self) -> bool:
        """True for events made only of comment lines (keepalives)."""
        return all(line.startswith(b":") for line in self.raw.split(b"\n") if line)

    @property
    def json(self) -> Any:
        """The data parsed as JSON, once; None when the data is not JSON (``[DONE]``, comments)."""
        if not self._parsed:
            self._parsed = True
            raw = self.raw
            if raw[:6] == b"data: " and b"\n" not in raw:  # the usual one-line event: parse it in place
                payload: bytes | str = raw[6:]
            else:
                payload = self.data
            if payload and payload != b"[DONE]" and payload != "[DONE]":
                try:
                    self._json = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    self._json = None
        return self._json

    def set_json(self, obj: Any) -> None:
        """Replace the event's data with ``obj`` serialized as JSON (keeps the ``event:`` field)."""
        self.raw = encode_event(orjson.dumps(obj), self.event)
        self._json, self._parsed, self._data = obj, True, None

    def set_raw(self, raw: bytes) -> None:
        """Replace the whole raw event (without its terminator)."""
        self.raw = raw
        self._data, self._json, self._parsed = None, None, False

    def __repr__(self) -> str:
        return f"Chunk({self.raw[:80]!r})"
