"""Small helpers for tests: read a gateway's SSE answer as raw events; record the exchanges that end."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path
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


class ReasoningUpstream(CatchAllUpstream):
    """An OpenAI-compatible reasoning server (vLLM, DeepSeek): ``reasoning_content`` before the answer, streamed
    a part a chunk, or whole in the message; the bodies it got in ``requests``."""

    def __init__(self, reasoning: list[str], answer: list[str]) -> None:
        self.reasoning, self.answer = reasoning, answer
        self.requests: list[dict[str, Any]] = []
        #: When set, a stream's last chunk waits for it (a test lets it go once it saw what came before).
        self.gate: asyncio.Event | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        head = {"id": "chatcmpl-r1", "created": 1, "model": body["model"]}
        usage = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
        if not body.get("stream"):
            return web.json_response({**head, "object": "chat.completion", "usage": usage, "choices": [{
                "index": 0, "finish_reason": "stop", "message": {
                    "role": "assistant", "content": "".join(self.answer),
                    "reasoning_content": "".join(self.reasoning)}}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        deltas = [{"role": "assistant", "content": ""}] + [{"reasoning_content": r} for r in self.reasoning] + [
            {"content": a} for a in self.answer]
        for i, delta in enumerate(deltas):
            if i == len(deltas) - 1 and self.gate is not None:
                await self.gate.wait()
            choice = {"index": 0, "delta": delta, "finish_reason": "stop" if i == len(deltas) - 1 else None}
            await resp.write(b"data: " + orjson.dumps({**head, "object": "chat.completion.chunk",
                                                       "choices": [choice]}) + b"\n\n")
        await resp.write(b"data: " + orjson.dumps({**head, "object": "chat.completion.chunk", "choices": [],
                                                   "usage": usage}) + b"\n\ndata: [DONE]\n\n")
        return resp


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


def make_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (common name ``name``) and its key, as PEM files (``openssl``)."""
    import subprocess

    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=30)
    return cert, key
