"""HTTP handlers of the OpenAI-compatible surface (thin: the Gateway does the work)."""
from __future__ import annotations

from aiohttp import web

from .app_keys import GATEWAY
from .exchange import Exchange

__all__ = ["routes"]

routes = web.RouteTableDef()


async def _serve(request: web.Request, endpoint: str, ingress: str = "openai") -> web.StreamResponse:
    gateway = request.app[GATEWAY].current
    exchange = Exchange(request_id=request["request_id"], endpoint=endpoint, headers=request.headers,
                        client_ip=request.remote, ingress=ingress)
    return await gateway.handle(request, exchange)


@routes.post("/v1/chat/completions")
@routes.post("/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "chat.completions")


@routes.post("/v1/messages")
async def messages(request: web.Request) -> web.StreamResponse:
    """Anthropic Messages ingress: translated to the OpenAI format at the edge, answered by any provider."""
    return await _serve(request, "chat.completions", ingress="anthropic")


@routes.post("/v1/completions")
@routes.post("/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "completions")


@routes.post("/v1/embeddings")
@routes.post("/embeddings")
async def embeddings(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "embeddings")


@routes.get("/v1/models")
@routes.get("/models")
async def models(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY].current
    exchange = Exchange(request_id=request["request_id"], endpoint="models", headers=request.headers,
                        client_ip=request.remote)
    return await gateway.handle_models(request, exchange)


@routes.get("/health/live")
async def live(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/health/ready")
async def ready(request: web.Request) -> web.Response:
    holder = request.app[GATEWAY]
    if holder.draining:
        return web.json_response({"status": "draining"}, status=503)
    return web.json_response({"status": "ready"})
