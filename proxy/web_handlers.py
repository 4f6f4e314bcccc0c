"""HTTP handlers of the OpenAI-compatible surface (thin: the Gateway does the work)."""
from __future__ import annotations

import hmac
from ipaddress import ip_address
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import orjson
import structlog
from aiohttp import web

from . import health
from .anthropic_format import anthropic_error_body
from .app_keys import GATEWAY, RELOADER, GatewayHolder
from .errors import GatewayError
from .exchange import Exchange
from .metrics import render_metrics
from .web_middlewares import REQUEST_ID_HEADER, begin, edge, error_for

if TYPE_CHECKING:
    from .gateway import Gateway

__all__ = ["routes", "api_routes", "API_ENDPOINTS"]

routes = web.RouteTableDef()


def client_ip(request: web.Request, trusted: tuple[Any, ...]) -> str | None:
    """The caller's address: the peer, or, when the peer is a trusted proxy, the right-most address of
    ``X-Forwarded-For`` that is not itself a trusted proxy."""
    peer = request.remote
    if not trusted or peer is None:
        return peer
    try:
        if not any(ip_address(peer) in net for net in trusted):
            return peer
    except ValueError:
        return peer
    forwarded = request.headers.get("X-Forwarded-For")
    if not forwarded:
        return peer
    for hop in reversed([h.strip() for h in forwarded.split(",") if h.strip()]):
        try:
            if not any(ip_address(hop) in net for net in trusted):
                return hop
        except ValueError:
            return peer  # garbage in the header: do not believe any of it
    return peer


def _refuse_while_draining(request_id: str, ingress: str = "openai") -> web.Response:
    """The 503 of every API request that arrives during a drain (in the ingress's error format)."""
    message = "The gateway is shutting down; retry the request."
    if ingress == "anthropic":
        body = orjson.dumps(anthropic_error_body(503, message))
    else:
        body = GatewayError(503, message, code="server_shutting_down").to_json()
    return web.Response(body=body, status=503, content_type="application/json",
                        headers={"Connection": "close", "Retry-After": "1", REQUEST_ID_HEADER: request_id})


def _client_gone() -> web.Response:
    response = web.Response(status=499, reason="Client Closed Request")
    response.force_close()
    return response


def _serving(holder: GatewayHolder, endpoint: str, ingress: str = "openai"
             ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The handler of one API endpoint: build the Exchange and hand it to the current Gateway (one frame, as
    every await inside a request resumes through each frame above it). Bound to its app's holder, so no
    app-state lookup per request."""
    async def handler(request: web.Request) -> web.StreamResponse:
        request_id, trace_id = begin(request)
        if holder.draining:
            return _refuse_while_draining(request_id, ingress)
        gateway = holder.current
        exchange = Exchange(request_id=request_id, endpoint=endpoint, headers=request.headers,
                            client_ip=client_ip(request, gateway.trusted_proxies), ingress=ingress,
                            trace_id=trace_id, response_headers={REQUEST_ID_HEADER: request_id})
        try:
            return await gateway.handle(request, exchange)
        except ConnectionError:
            # The client went away while its answer was written (gateway.handle recorded the disconnect): not a
            # bug, nothing to log. aiohttp drops what it cannot send; the connection is not kept.
            return _client_gone()
        except Exception as exc:  # gateway.handle answers every GatewayError itself: this is a bug
            response = error_for(request, exc)
            response.headers[REQUEST_ID_HEADER] = request_id
            return response

    handler.__name__ = handler.__qualname__ = endpoint.replace(".", "_") + ("" if ingress == "openai" else
                                                                           "_" + ingress)
    return handler


#: The API endpoints: (path, endpoint, ingress). ``/v1/messages`` is the Anthropic Messages ingress, translated
#: to the OpenAI format at the edge and answered by any provider.
API_ENDPOINTS = (
    ("/v1/chat/completions", "chat.completions", "openai"), ("/chat/completions", "chat.completions", "openai"),
    ("/v1/messages", "chat.completions", "anthropic"), ("/v1/completions", "completions", "openai"),
    ("/completions", "completions", "openai"), ("/v1/embeddings", "embeddings", "openai"),
    ("/embeddings", "embeddings", "openai"),
)


def _counting(holder: GatewayHolder) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The handler of ``POST /v1/messages/count_tokens`` (the anthropic SDK's ``messages.count_tokens``): the
    gateway's estimate of the prompt's tokens (:meth:`Gateway.handle_count_tokens`: a rule of thumb, no tokenizer,
    no upstream called; authenticated, not rate-limited as a completion). Answers in Anthropic's format."""
    async def messages_count_tokens(request: web.Request) -> web.StreamResponse:
        request_id, trace_id = begin(request)
        if holder.draining:
            return _refuse_while_draining(request_id, "anthropic")
        gateway = holder.current
        exchange = Exchange(request_id=request_id, endpoint="messages.count_tokens", headers=request.headers,
                            client_ip=client_ip(request, gateway.trusted_proxies), ingress="anthropic",
                            trace_id=trace_id, response_headers={REQUEST_ID_HEADER: request_id})
        try:
            return await gateway.handle_count_tokens(request, exchange)
        except ConnectionError:
            return _client_gone()
        except Exception as exc:  # handle_count_tokens answers every GatewayError itself: this is a bug
            error_for(request, exc)  # logs it
            response = web.Response(body=orjson.dumps(anthropic_error_body(500, "Internal server error")),
                                    status=500, content_type="application/json")
            response.headers[REQUEST_ID_HEADER] = request_id
            return response

    return messages_count_tokens


def api_routes(holder: GatewayHolder) -> list[web.RouteDef]:
    """The POST routes of the API, their handlers bound to ``holder``."""
    handlers: dict[tuple[str, str], Callable[[web.Request], Awaitable[web.StreamResponse]]] = {}
    defs = []
    for path, endpoint, ingress in API_ENDPOINTS:
        handler = handlers.get((endpoint, ingress))
        if handler is None:
            handler = handlers[(endpoint, ingress)] = _serving(holder, endpoint, ingress)
        defs.append(web.post(path, handler))
    defs.append(web.post("/v1/messages/count_tokens", _counting(holder)))
    return defs


def _models_exchange(request: web.Request, gateway: "Gateway") -> Exchange:
    """The Exchange of a ``/v1/models`` request (the list, or one model)."""
    return Exchange(request_id=request["request_id"], endpoint="models", headers=request.headers,
                    client_ip=client_ip(request, gateway.trusted_proxies), trace_id=request["trace_id"],
                    response_headers={REQUEST_ID_HEADER: request["request_id"]})


@routes.get("/v1/models")
@routes.get("/models")
@edge
async def models(request: web.Request) -> web.StreamResponse:
    holder = request.app[GATEWAY]
    if holder.draining:
        return _refuse_while_draining(request["request_id"])
    gateway = holder.current
    return await gateway.handle_models(request, _models_exchange(request, gateway))


#: Methods of ``/v1/models/{model}`` (a GET route answers HEAD too, as ``/v1/models`` does).
_MODEL_METHODS = ("GET", "HEAD")


@routes.route("*", "/v1/models/{model:.+}")
@routes.route("*", "/models/{model:.+}")
@edge
async def model(request: web.Request) -> web.StreamResponse:
    """``GET /v1/models/{model}``; the id may contain ``/`` (``meta-llama/Llama-3-8B``, sent raw or as ``%2F``).

    The route takes every method, and answers 405 itself for the others: the catch-all route (``create_app``)
    finds a known path's methods by its exact path, which a path with a variable part never is."""
    if request.method not in _MODEL_METHODS:
        raise web.HTTPMethodNotAllowed(request.method, _MODEL_METHODS)
    holder = request.app[GATEWAY]
    if holder.draining:
        return _refuse_while_draining(request["request_id"])
    gateway = holder.current
    return await gateway.handle_model(request, _models_exchange(request, gateway), request.match_info["model"])


@routes.get("/health/live")
@edge
async def live(request: web.Request) -> web.Response:
    ok, body = await health.liveness(request.app[GATEWAY].current)
    return web.json_response(body, status=200 if ok else 503)


@routes.get("/health/ready")
@edge
async def ready(request: web.Request) -> web.Response:
    holder = request.app[GATEWAY]
    ok, body = await health.readiness(holder.current, holder.draining)
    return web.json_response(body, status=200 if ok else 503)


@routes.get("/health")
@edge
async def health_report(request: web.Request) -> web.Response:
    holder = request.app[GATEWAY]
    status, body = await health.report(holder.current, holder.draining)
    return web.json_response(body, status=status)


@routes.get("/metrics")
@edge
async def metrics(request: web.Request) -> web.Response:
    return metrics_response(request)


@routes.get("/metrics/summary")
@edge
async def metrics_summary(request: web.Request) -> web.Response:
    plugin = request.app[GATEWAY].current.plugin("metrics")
    if plugin is None:
        raise GatewayError(404, "Metrics are disabled (observability.metrics: false).", code="not_found")
    return web.json_response(plugin.summary())


def metrics_response(request: web.Request) -> web.Response:
    """Prometheus text exposition of the process's registry (also served on observability.metrics_port)."""
    gateway = request.app[GATEWAY].current
    if gateway.plugin("metrics") is None:
        raise GatewayError(404, "Metrics are disabled (observability.metrics: false).", code="not_found")
    for callback in gateway.scrape_callbacks:
        callback()
    body, headers = render_metrics(gateway.registry, request.headers.getall("Accept", []))
    return web.Response(body=body, headers=headers)


@routes.post("/admin/reload")
@edge
async def admin_reload(request: web.Request) -> web.Response:
    """Reload the config file (like SIGHUP). Needs ``Authorization: Bearer <server.admin_key>``."""
    key = request.app[GATEWAY].current.config.server.admin_key
    if not key:
        raise GatewayError(403, "The admin API is disabled (server.admin_key is not set).", code="admin_disabled")
    given = request.headers.get("Authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
        gateway = request.app[GATEWAY].current
        structlog.get_logger("ssegate.admin").warning(
            "admin_auth_failed", path=request.path, client_ip=client_ip(request, gateway.trusted_proxies),
            key_given=bool(given))
        raise GatewayError(401, "Invalid admin key.", code="invalid_admin_key")
    applied, problems = await request.app[RELOADER].reload()
    if not applied:
        body = {"error": {"message": "The new configuration was refused; the old one keeps serving.",
                          "type": "invalid_request_error", "param": None, "code": "config_invalid"},
                "problems": problems}
        return web.json_response(body, status=422)
    return web.json_response({"status": "reloaded", "reloads": request.app[RELOADER].reloads})
