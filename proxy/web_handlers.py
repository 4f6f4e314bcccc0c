"""HTTP handlers of the OpenAI-compatible surface (thin: the Gateway does the work)."""
from __future__ import annotations

import hmac

from aiohttp import web

from .app_keys import GATEWAY, RELOADER
from .errors import GatewayError
from .exchange import Exchange

__all__ = ["routes"]

routes = web.RouteTableDef()


def _refuse_while_draining() -> web.Response:
    err = GatewayError(503, "The gateway is shutting down; retry the request.", code="server_shutting_down")
    return web.Response(body=err.to_json(), status=503, content_type="application/json",
                        headers={"Connection": "close", "Retry-After": "1"})


async def _serve(request: web.Request, endpoint: str, ingress: str = "openai") -> web.StreamResponse:
    holder = request.app[GATEWAY]
    if holder.draining:
        return _refuse_while_draining()
    gateway = holder.current
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


@routes.post("/admin/reload")
async def admin_reload(request: web.Request) -> web.Response:
    """Reload the config file (like SIGHUP). Needs ``Authorization: Bearer <server.admin_key>``."""
    key = request.app[GATEWAY].current.config.server.admin_key
    if not key:
        raise GatewayError(403, "The admin API is disabled (server.admin_key is not set).", code="admin_disabled")
    given = request.headers.get("Authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
        raise GatewayError(401, "Invalid admin key.", code="invalid_admin_key")
    applied, problems = await request.app[RELOADER].reload()
    if not applied:
        body = {"error": {"message": "The new configuration was refused; the old one keeps serving.",
                          "type": "invalid_request_error", "param": None, "code": "config_invalid"},
                "problems": problems}
        return web.json_response(body, status=422)
    return web.json_response({"status": "reloaded", "reloads": request.app[RELOADER].reloads})
