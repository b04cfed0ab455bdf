"""Thin HTTP handlers for everything but the two completion endpoints (``gateway.completions_api``)."""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.errors import GatewayError
from gateway.openapi import errors, json_body
from gateway.protocol import ChatCompletionRequest, CompletionRequest
from gateway.services import Services

log = logging.getLogger("stopgate")
router = APIRouter()


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {"type": "string", "description": "One chunk as JSON (a completion chunk or an error), or [DONE]"},
        "event": {"type": "string"},
    },
}
GENERATION_ERRORS = errors(400, 401, 403, 404, 413, 429, 502, 503, 504)
GENERATED: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A completion (JSON), or its chunks (text/event-stream) with `stream`",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            # OpenAPI 3.1 (FastAPI's) has an event stream's `schema` describe each event.
            "text/event-stream": {"schema": SSE_EVENT},
        },
    }
}


# The two completion endpoints are served by ``gateway.completions_api`` as raw
# ASGI, ahead of FastAPI's routing (they carry all the traffic). They are
# declared here only so that the OpenAPI schema describes them and their bodies.


@router.post(
    "/v1/completions", responses={**GENERATED, **GENERATION_ERRORS}, openapi_extra=json_body(CompletionRequest)
)
async def completions() -> Response:
    """Create a completion (OpenAI's API; see the README for stopgate's extension fields)."""
    raise _NOT_ROUTED


@router.post(
    "/v1/chat/completions",
    responses={**GENERATED, **GENERATION_ERRORS},
    openapi_extra=json_body(ChatCompletionRequest),
)
async def chat_completions() -> Response:
    """Create a chat completion (OpenAI's API; see the README for stopgate's extension fields)."""
    raise _NOT_ROUTED


_NOT_ROUTED = RuntimeError("the completion endpoints are served by gateway.completions_api.CompletionsEndpoints")


@router.get("/v1/models", responses=errors(401))
async def models(request: Request) -> dict[str, Any]:
    """The model names this caller's key may use."""
    services = _services(request)
    principal = services.auth.authenticate(request.headers.get("authorization"))
    created = int(time.time())
    data = [
        {"id": name, "object": "model", "created": created, "owned_by": "stopgate", "root": route.upstream_model}
        for route in services.routes.routes
        if principal.may_use(route.name)
        for name in route.names
    ]
    return {"object": "list", "data": data}


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process serves HTTP. Says nothing about the engine."""
    return {"status": "ok"}


@router.get(
    "/ready",
    responses={
        200: {"description": "The engine answers and serves every route's model"},
        503: {"description": "Not ready (engine down, a model missing, or draining)"},
    },
)
async def ready(request: Request) -> JSONResponse:
    """Readiness: the engine answers and serves every route's model."""
    services = _services(request)
    if services.admission.draining:
        return JSONResponse({"status": "draining", "reason": "shutting down"}, status_code=503)
    try:
        listing = await services.upstream.get_json("/v1/models", timeout_s=3.0)
    except GatewayError as exc:
        return JSONResponse({"status": "unavailable", "reason": exc.message}, status_code=503)
    served = (
        {m.get("id") for m in listing.get("data", []) if isinstance(m, dict)} if isinstance(listing, dict) else set()
    )
    missing = sorted({r.upstream_model for r in services.routes.routes} - served)
    if missing:
        return JSONResponse({"status": "unavailable", "reason": f"engine does not serve {missing}"}, status_code=503)
    return JSONResponse({"status": "ready"})


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
    },
)
async def metrics(request: Request) -> Response:
    # Rendering walks every series: do it off the event loop so a scrape never stalls requests.
    body = await anyio.to_thread.run_sync(generate_latest, _services(request).metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
