"""Thin HTTP handlers: parse, call one service, pick JSON or SSE."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import ClientDisconnect

from gateway.control.plane import choice_text
from gateway.engine.client import EngineClient
from gateway.errors import (
    ClientClosed,
    GatewayError,
    LimitExceeded,
    PayloadTooLarge,
    RequestTimeout,
    UpstreamError,
    internal_error,
)
from gateway.evaluation import ReferenceItem
from gateway.http.admission import Ticket
from gateway.http.openapi import errors, json_body
from gateway.http.services import Services
from gateway.metrics import UNKNOWN_POLICY, UNKNOWN_ROUTE
from gateway.openai import sse
from gateway.openai.chunks import ResponseBuilder
from gateway.openai.fields import check_client_fields
from gateway.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    Endpoint,
    parse_json_body,
    validate_request,
)
from gateway.stopping.ensemble import EnsembleGeneration, is_ensemble
from gateway.stopping.session import Generation, RequestContext

AnyGeneration = Generation | EnsembleGeneration


def make_generation(upstream: EngineClient, ctx: RequestContext, *, vllm: bool) -> AnyGeneration:
    if is_ensemble(ctx):
        return EnsembleGeneration(upstream, ctx, vllm=vllm)
    return Generation(upstream, ctx, vllm=vllm)


log = logging.getLogger("stopgate")
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
    services = _services(request)
    metrics = services.metrics
    request_id = request_id_of(request)
    headers = {"x-request-id": request_id}
    started = time.monotonic()
    route_name, policy = UNKNOWN_ROUTE, UNKNOWN_POLICY
    ticket: Ticket | None = None
    try:
        principal = services.auth.authenticate(request.headers.get("authorization"))
        ticket = services.admission.admit(principal)
        settings = services.settings
        body = parse_json_body(await read_body(request, settings.max_request_bytes, settings.body_timeout_s))
        req = validate_request(endpoint, body)
        route = services.route_for(req.model)
        route_name = route.name
        services.auth.authorize(principal, route.name, reference_id=req.reference is not None)
        check_prompt_size(req, settings.max_prompt_chars)
        check_client_fields(
            req,
            req.passthrough(),
            allowed=route.client_fields,
            max_n=settings.max_n,
            max_batch_prompts=settings.max_batch_prompts,
        )
        ticket.enter_route(route)
        item = services.control.match(route, req)
        ctx = RequestContext(
            endpoint,
            req,
            route,
            request_id,
            max_n=services.settings.max_n,
            max_cost_multiple=services.settings.max_cost_multiple,
            max_ensemble_samples=services.settings.max_ensemble_samples,
            controlled=services.control.controlled(route),
        )
        gen = make_generation(services.upstream, ctx, vllm=services.settings.upstream_is_vllm)
        policy = gen.policy_name
        if req.stream:
            chunks = gen.chunks()
            # The first chunk may be long in coming (an ensemble's comes after its votes): a client
            # that leaves before it cancels the work, as in the non-streaming path.
            first = await _with_cancellation(request, _first(chunks))
            if first is None:
                return Response(status_code=499)  # client gone; nobody reads this
            response: Response = sse.EventStreamResponse(
                _sse_body(first, chunks, gen, services, started, item, ticket), headers=headers
            )
            ticket = None  # the stream's body releases it when the stream ends
            return response
        result = await _with_cancellation(request, _collect(gen, endpoint))
        if result is None:
            return Response(status_code=499)  # client gone; nobody reads this
        _record(services, gen, 200, started)
        _finished(services, gen, item, choice_text(result))
        return JSONResponse(result, headers=headers)
    except GatewayError as exc:
        if isinstance(exc, UpstreamError):
            metrics.upstream_errors.labels(exc.kind).inc()
        metrics.requests.labels(route_name, policy, "error", str(exc.status_code)).inc()
        return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers={**headers, **exc.headers})
    finally:
        if ticket is not None:
            ticket.release()


def check_prompt_size(req: CompletionRequest | ChatCompletionRequest, limit: int) -> None:
    """The prompt (or the messages' text) in characters, against ``max_prompt_chars``."""
    if isinstance(req, CompletionRequest):
        prompt = req.prompt
        if isinstance(prompt, str):
            size = len(prompt)
        else:  # several prompts, or token ids (one each)
            size = sum(len(p) if isinstance(p, str | list) else 1 for p in prompt)
        param = "prompt"
    else:
        size = sum(len(m.content) if isinstance(m.content, str) else len(str(m.content or "")) for m in req.messages)
        param = "messages"
    if size > limit:
        raise LimitExceeded(f"The prompt has {size} characters; the limit is {limit} (max_prompt_chars).", param=param)


async def _first(chunks: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    """Wait for the first chunk, so an engine refusal still gets a real HTTP status."""
    try:
        return await chunks.__anext__()
    except BaseException:
        with anyio.CancelScope(shield=True):
            await chunks.aclose()  # type: ignore[attr-defined]
        raise


async def _collect(gen: AnyGeneration, endpoint: Endpoint) -> dict[str, Any]:
    builder = ResponseBuilder(endpoint)
    async for chunk in gen.chunks():
        builder.add(chunk)
    return builder.build()


async def _sse_body(
    first: dict[str, Any],
    chunks: AsyncIterator[dict[str, Any]],
    gen: AnyGeneration,
    services: Services,
    started: float,
    item: ReferenceItem | None,
    ticket: Ticket,
) -> AsyncIterator[bytes]:
    code, ended = 200, False
    texts = [choice_text(first)]
    try:
        yield sse.encode(first)
        async for chunk in chunks:
            texts.append(choice_text(chunk))
            yield sse.encode(chunk)
        ended = True
    except GatewayError as exc:
        code = exc.status_code
        if isinstance(exc, UpstreamError):
            services.metrics.upstream_errors.labels(exc.kind).inc()
        yield sse.encode(exc.to_dict())
    except Exception:
        code = 500
        log.exception("error while streaming request %s", gen.ctx.request_id)
        yield sse.encode(internal_error().to_dict())
    finally:
        # A client that leaves cancels us here: close the upstream (the engine
        # aborts) even though the surrounding scope is cancelled.
        with anyio.CancelScope(shield=True):
            await chunks.aclose()  # type: ignore[attr-defined]
            _record(services, gen, code, started)
            ticket.release()
            if code == 200 and ended:
                _finished(services, gen, item, "".join(texts))
            elif code == 200:  # the client left: its tokens count as live work, its partial text is no sample
                _count_live(services, gen)
    yield sse.DONE_EVENT


def _count_live(services: Services, gen: AnyGeneration) -> None:
    try:
        services.control.count_live(gen.ctx.route.name, gen.accounting.net)
    except Exception:
        log.exception("evaluation bookkeeping failed for request %s", gen.ctx.request_id)


def _finished(services: Services, gen: AnyGeneration, item: ReferenceItem | None, text: str) -> None:
    """Hand a successful request to the control plane: live tokens, a gold sample, maybe a shadow rerun.

    Bookkeeping never fails the request it counts: an error here is logged.
    """
    try:
        if isinstance(gen, Generation):
            services.control.finished(gen, item, text, services.upstream)
        else:
            services.control.count_live(gen.ctx.route.name, gen.accounting.net)
    except Exception:
        log.exception("evaluation bookkeeping failed for request %s", gen.ctx.request_id)


def _record(services: Services, gen: AnyGeneration, code: int, started: float) -> None:
    try:
        _observe(services, gen, code, started)
    except Exception:  # a metric update never fails the request it counts
        log.exception("recording metrics failed for request %s", gen.ctx.request_id)


def _observe(services: Services, gen: AnyGeneration, code: int, started: float) -> None:
    m = services.metrics
    acc = gen.accounting
    route = gen.ctx.route.name
    stop_reason = "error" if code >= 400 else acc.stop_reason or "finished"
    m.requests.labels(route, gen.policy_name, stop_reason, str(code)).inc()
    m.tokens.labels(route, "prompt").inc(acc.prompt)
    m.tokens.labels(route, "completion").inc(acc.main)
    m.tokens.labels(route, "probe").inc(acc.probe)
    m.tokens.labels(route, "forced").inc(acc.forced)
    m.request_duration.labels(route).observe(time.monotonic() - started)
    if gen.probes is not None:
        for seconds in gen.probes.stats.durations:
            m.probe_duration.labels(route).observe(seconds)
    if acc.first_token_at is not None:
        m.ttft.labels(route).observe(acc.first_token_at - started)


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
