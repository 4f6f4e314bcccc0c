"""The in-process simulated provider: the embedded default, no network and no keys.

It runs the same :class:`proxy.simulator.Simulator` that ``ssegate simulate`` serves over HTTP.
"""
from __future__ import annotations

from typing import Any, AsyncIterator

import orjson

from ..config.schema import ProviderConfig
from ..simulator import Simulator
from ..upstream import Provider, UpstreamError, UpstreamRequest, UpstreamResponse
from ..errors import GatewayError

__all__ = ["SimulatedProvider"]


class _BodyResponse(UpstreamResponse):
    def __init__(self, body: bytes) -> None:
        self._body = body

    async def read(self) -> bytes:
        return self._body


class _StreamResponse(UpstreamResponse):
    def __init__(self, events: AsyncIterator[bytes]) -> None:
        self._events = events

    async def batches(self) -> AsyncIterator[list[bytes]]:
        async for event in self._events:
            yield [event]



class SimulatedProvider(Provider):
    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        self.simulator = Simulator(config.simulation)

    def list_models(self) -> list[str]:
        return [m["id"] for m in self.simulator.models()]

    def serves(self, model: str) -> bool:
        """Routed here by the provider's ``models`` patterns and answered by the simulator (its ``simulation.models``:
        a model the simulator does not serve gets its 404, so ``models.retrieve`` must not say it exists)."""
        return super().serves(model) and self.simulator.serves(model)

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        endpoint = request.exchange.endpoint
        body: Any = request.payload
        if request.route.model != body.get("model"):
            body = {**body, "model": request.route.model}
        sim = self.simulator
        try:
            sim.check(body, endpoint)
            if endpoint == "embeddings":
                return _BodyResponse(orjson.dumps(sim.embeddings(body)))
            if request.stream:
                gen = sim.chat_stream(body) if endpoint == "chat.completions" else sim.completion_stream(body)
                return _StreamResponse(gen)
            if endpoint == "chat.completions":
                return _BodyResponse(orjson.dumps(await sim.chat_completion(body)))
            return _BodyResponse(orjson.dumps(await sim.completion(body)))
        except UpstreamError:
            raise
        except GatewayError as exc:
            raise UpstreamError(exc.status, exc.message, kind="status", retryable=exc.status in (429, 500, 502, 503, 504),
                                code=exc.code, param=exc.param, type=exc.type, headers=exc.headers) from exc
