"""Small helpers for tests: read a gateway's SSE answer as raw events; record the exchanges that end."""
from __future__ import annotations

import os
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from proxy import hookimpl
from proxy.sse import SSEParser


class CatchAllUpstream:
    """Base of the small upstreams of tests: every POST goes to :meth:`handle`, on 127.0.0.1 (a free port)."""

    runner: web.AppRunner | None = None
    port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    async def start(self) -> "CatchAllUpstream":
        from proxy.web_app import start_server

        app = web.Application()
        app.router.add_post("/{tail:.*}", self.handle)
        self.runner, self.port = await start_server(app, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


class Recorder:
    """A plugin recording every exchange that reaches ``exchange_done`` (in ``done``)."""

    def __init__(self) -> None:
        self.done: list[Any] = []

    @hookimpl
    def exchange_done(self, exchange: Any) -> None:
        self.done.append(exchange)


async def read_stream(url: str, body: dict[str, Any], headers: dict[str, str] | None = None
                      ) -> tuple[int, dict[str, str], list[bytes]]:
    """POST and collect the raw SSE events (comments included) of the answer."""
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=orjson.dumps(body), headers=headers or {}) as resp:
            parser = SSEParser()
            events: list[bytes] = []
            async for data in resp.content.iter_any():
                events.extend(parser.feed(data))
            return resp.status, dict(resp.headers), events


def data_events(events: list[bytes]) -> list[Any]:
    """Parsed JSON of the data events (``[DONE]`` as the string "[DONE]"); comments skipped."""
    out: list[Any] = []
    for ev in events:
        if ev.startswith(b":"):
            continue
        data = ev[len(b"data: "):]
        out.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return out


def content_of(events: list[bytes]) -> str:
    text = []
    for obj in data_events(events):
        if isinstance(obj, dict):
            for choice in obj.get("choices") or ():
                text.append((choice.get("delta") or {}).get("content") or "")
    return "".join(text)


CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}]}


def child_pids(parent: int) -> set[int]:
    """The live (not zombie) child processes of ``parent``, from /proc."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent and fields[0] != "Z":
                found.add(int(entry))
    return found
