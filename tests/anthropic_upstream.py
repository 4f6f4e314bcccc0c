"""An upstream speaking the Anthropic Messages wire format exactly (event names and fields), for tests."""
from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from proxy.web_app import start_server


class AnthropicUpstream:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.texts = ["Hello", " from", " Claude"]
        self.tool: dict[str, Any] | None = None  # {"name": ..., "input_parts": [...]} to answer with a tool call
        #: Parts of a thinking block to answer with first (extended thinking), and its signature.
        self.thinking: list[str] | None = None
        self.signature = "EqQBCkgIARABGAIiQL-signature"
        #: Blocks of a server tool (``server_tool_use``, ``web_search_tool_result``, ...) to answer with before the
        #: text; a block with an ``input`` streams it in two ``input_json_delta`` parts.
        self.server_blocks: list[dict[str, Any]] = []
        #: Text blocks with citations to answer with after the text: (text, citations); a stream sends each
        #: citation as a ``citations_delta`` before the block's text.
        self.cited: list[tuple[str, list[dict[str, Any]]]] = []
        self.stop_reason = "end_turn"
        self.stop_sequence: str | None = None  # the matched one, sent with stop_reason "stop_sequence"
        self.error: tuple[int, str, str] | None = None  # (status, type, message)
        self.error_event_at: int | None = None  # send an `error` event in place of this text delta
        self.delay = 0.0
        #: Prompt-cache counts added to the usage (``cache_read_input_tokens``, ...); ``cache_in_delta`` sends them
        #: (and ``input_tokens``) in the stream's message_delta only, as its cumulative counts.
        self.cache_usage: dict[str, int] = {}
        self.cache_in_delta = False
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    async def start(cls) -> "AnthropicUpstream":
        self = cls()
        app = web.Application()
        app.router.add_post("/v1/messages", self._messages)
        self._runner, self.port = await start_server(app, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _content(self) -> list[dict[str, Any]]:
        content: list[dict[str, Any]] = []
        if self.thinking is not None:
            content.append({"type": "thinking", "thinking": "".join(self.thinking), "signature": self.signature})
        content += self.server_blocks
        content.append({"type": "text", "text": "".join(self.texts)})
        content += [{"type": "text", "text": text, "citations": citations} for text, citations in self.cited]
        if self.tool:
            content.append({"type": "tool_use", "id": "toolu_01A", "name": self.tool["name"],
                            "input": orjson.loads("".join(self.tool["input_parts"]))})
        return content

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if self.error is not None:
            status, kind, message = self.error
            return web.json_response({"type": "error", "error": {"type": kind, "message": message}}, status=status)
        usage_in = {"input_tokens": 25, "output_tokens": 1, **({} if self.cache_in_delta else self.cache_usage)}
        if not body.get("stream"):
            return web.json_response({
                "id": "msg_01XYZ", "type": "message", "role": "assistant", "model": body["model"],
                "content": self._content(), "stop_reason": "tool_use" if self.tool else self.stop_reason,
                "stop_sequence": self.stop_sequence,
                "usage": {"input_tokens": 25, "output_tokens": 15, **self.cache_usage}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(name: str, obj: dict[str, Any]) -> None:
            await resp.write(b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n")
            if self.delay:
                await asyncio.sleep(self.delay)

        await send("message_start", {"type": "message_start", "message": {
            "id": "msg_01XYZ", "type": "message", "role": "assistant", "model": body["model"], "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": usage_in}})
        at = 0  # the index of the next content block
        if self.thinking is not None:
            await send("content_block_start", {"type": "content_block_start", "index": 0,
                                               "content_block": {"type": "thinking", "thinking": ""}})
            for part in self.thinking:
                await send("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                   "delta": {"type": "thinking_delta", "thinking": part}})
            await send("content_block_delta", {"type": "content_block_delta", "index": 0,
                                               "delta": {"type": "signature_delta", "signature": self.signature}})
            await send("content_block_stop", {"type": "content_block_stop", "index": 0})
            at = 1
        for block in self.server_blocks:
            streamed = {**block, "input": {}} if "input" in block else block
            await send("content_block_start", {"type": "content_block_start", "index": at, "content_block": streamed})
            if "input" in block:
                text = orjson.dumps(block["input"]).decode()
                for part in (text[:len(text) // 2], text[len(text) // 2:]):
                    await send("content_block_delta", {"type": "content_block_delta", "index": at,
                                                       "delta": {"type": "input_json_delta", "partial_json": part}})
            await send("content_block_stop", {"type": "content_block_stop", "index": at})
            at += 1
        await send("content_block_start", {"type": "content_block_start", "index": at,
                                           "content_block": {"type": "text", "text": ""}})
        await send("ping", {"type": "ping"})
        for i, text in enumerate(self.texts):
            if self.error_event_at == i:
                await send("error", {"type": "error", "error": {"type": "overloaded_error",
                                                                 "message": "Overloaded"}})
                return resp
            await send("content_block_delta", {"type": "content_block_delta", "index": at,
                                               "delta": {"type": "text_delta", "text": text}})
        await send("content_block_stop", {"type": "content_block_stop", "index": at})
        for text, citations in self.cited:
            at += 1
            await send("content_block_start", {"type": "content_block_start", "index": at,
                                               "content_block": {"type": "text", "text": "", "citations": []}})
            for citation in citations:
                await send("content_block_delta", {"type": "content_block_delta", "index": at,
                                                   "delta": {"type": "citations_delta", "citation": citation}})
            await send("content_block_delta", {"type": "content_block_delta", "index": at,
                                               "delta": {"type": "text_delta", "text": text}})
            await send("content_block_stop", {"type": "content_block_stop", "index": at})
        if self.tool:
            await send("content_block_start", {"type": "content_block_start", "index": at + 1, "content_block": {
                "type": "tool_use", "id": "toolu_01A", "name": self.tool["name"], "input": {}}})
            for part in self.tool["input_parts"]:
                await send("content_block_delta", {"type": "content_block_delta", "index": at + 1,
                                                   "delta": {"type": "input_json_delta", "partial_json": part}})
            await send("content_block_stop", {"type": "content_block_stop", "index": at + 1})
        await send("message_delta", {"type": "message_delta", "delta": {
            "stop_reason": "tool_use" if self.tool else self.stop_reason, "stop_sequence": self.stop_sequence},
            "usage": {"output_tokens": 15, **({"input_tokens": 25, **self.cache_usage} if self.cache_in_delta else {})}})
        await send("message_stop", {"type": "message_stop"})
        await resp.write_eof()
        return resp
