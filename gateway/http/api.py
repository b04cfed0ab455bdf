"""Thin HTTP handlers: parse, call one service, pick JSON or SSE."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Awaitable
from typing import Any, TypeVar

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from gateway.errors import ClientClosed, GatewayError, PayloadTooLarge, RequestTimeout
from gateway.http.endpoints import generate
from gateway.http.openapi import errors, json_body
from gateway.http.services import Services
from gateway.openai.protocol import ChatCompletionRequest, CompletionRequest, Endpoint

router = APIRouter()

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
T = TypeVar("T")


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def request_id_of(request: Request) -> str:
    """The client's ``x-request-id`` if it is sane, else a fresh one."""
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


async def read_body(request: Request, limit: int, timeout_s: float | None = None) -> bytes:
    """The body, counted against ``limit`` as it streams in, within ``timeout_s`` (408 past it)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The request body is {declared} bytes; the limit is {limit}.")
    data = bytearray()
    try:
        with anyio.fail_after(timeout_s):
            async for piece in request.stream():
                data += piece
                if len(data) > limit:
                    raise PayloadTooLarge(f"The request body exceeds the limit of {limit} bytes.")
    except TimeoutError as exc:
        raise RequestTimeout(f"The request body did not arrive within {timeout_s:g} s (body_timeout_s).") from exc
    except ClientDisconnect as exc:
        raise ClientClosed("The client closed the connection while sending its request body.") from exc
    return bytes(data)


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


@router.post(
    "/v1/completions", responses={**GENERATED, **GENERATION_ERRORS}, openapi_extra=json_body(CompletionRequest)
)
async def completions(request: Request) -> Response:
    return await _generate(request, "completions")


@router.post(
    "/v1/chat/completions",
    responses={**GENERATED, **GENERATION_ERRORS},
    openapi_extra=json_body(ChatCompletionRequest),
)
async def chat_completions(request: Request) -> Response:
    return await _generate(request, "chat")


async def _generate(request: Request, endpoint: Endpoint) -> Response:
    # The completion endpoints (gateway/http/endpoints.py) answer these paths ahead of FastAPI; a request
    # routed here all the same (an app mounted without that middleware) is served by the same code.
    return _RawCompletion(endpoint)


class _RawCompletion(Response):
    """Hands the request to the raw completion endpoint, which sends its own answer."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await generate(scope["app"].state.services, self.endpoint, scope, receive, send)


async def _with_cancellation(request: Request, work: Awaitable[T]) -> T | None:
    """Race the work against the client leaving; cancel the work if it does (as vLLM does)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with anyio.CancelScope(shield=True):
        try:
            await task
        except (asyncio.CancelledError, GatewayError):
            pass
    return None


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


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
    body = await anyio.to_thread.run_sync(_services(request).metrics.exposition)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
