"""Plugins loaded by dotted path in the tests."""
from __future__ import annotations

import attrs

from proxy import hookimpl

CALLS: list[str] = []


class Audit:
    @attrs.frozen
    class Config:
        level: str = "info"
        tag: str = "audit"

    def __init__(self, config: "Audit.Config") -> None:
        self.config = config

    @hookimpl
    def check_request(self, exchange):
        CALLS.append(f"{self.config.tag}:{self.config.level}")


@hookimpl
def check_request(exchange):
    CALLS.append("module")


class UnknownHook:
    @hookimpl
    def on_chunks(self, exchange, chunk):  # typo of on_chunk
        pass


class UnknownArgument:
    @hookimpl
    def on_chunk(self, exchange, chunk, extra):
        pass


class Wrapper:
    @hookimpl(wrapper=True)
    def check_request(self, exchange):
        return (yield)


class NeedsNewerHookApi:
    requires_hook_api = "1.99"

    @hookimpl
    def check_request(self, exchange):
        pass


class NeedsOtherMajorHookApi:
    requires_hook_api = "0.9"


class MalformedHookApi:
    requires_hook_api = "one"


class NeedsThisHookApi:
    requires_hook_api = "1.0"

    @hookimpl
    def check_request(self, exchange):
        CALLS.append("this-api")


class TryFirst:
    @hookimpl(tryfirst=True)
    def check_request(self, exchange):
        pass


class AsyncChunk:
    @hookimpl
    async def on_chunk(self, chunk):
        return None
