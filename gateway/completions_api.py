"""``POST /v1/completions`` and ``/v1/chat/completions`` as raw ASGI, in front of FastAPI.

These two endpoints carry all the traffic, so they skip FastAPI's route
machinery (routing, dependency solving, exception middleware, a send wrapper
per chunk) and ``StreamingResponse`` (a task group per response): on the
2-core benchmark box that framework path cost more CPU per request and per
chunk than the gateway's own work. The handler stays thin all the same: parse,
authenticate, admit, validate, pick the route, run one ``Generation``, answer
JSON or SSE, hand the finished request to the control plane. Every other
route, and every error these two do not render themselves, stays with FastAPI
(``gateway.api``, ``gateway.app``); ``gateway.api`` also declares these two
paths, so that the OpenAPI schema describes them, but requests for them never
reach FastAPI's routing.

A client that leaves cancels the work, as vLLM's ``with_cancellation`` does:
the generation's cleanup closes the upstream stream, and the engine aborts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import anyio
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway import sse
from gateway.chunks import ResponseBuilder
from gateway.control.plane import choice_text
from gateway.ensemble import EnsembleGeneration, is_ensemble
from gateway.errors import GatewayError, LimitExceeded, PayloadTooLarge, UpstreamError, internal_error
from gateway.evaluation import ReferenceItem
from gateway.metrics import UNKNOWN_POLICY, UNKNOWN_ROUTE
from gateway.protocol import ChatCompletionRequest, CompletionRequest, Endpoint, parse_json_body, validate_request
from gateway.services import Services, Ticket
from gateway.serving import Generation, RequestContext
from gateway.upstream import EngineClient

log = logging.getLogger("stopgate")

AnyGeneration = Generation | EnsembleGeneration
T = TypeVar("T")
RawHeaders = list[tuple[bytes, bytes]]

ENDPOINTS: dict[str, Endpoint] = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# What starlette's JSONResponse and StreamingResponse sent, byte for byte.
_json = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
_JSON_TYPE = (b"content-type", b"application/json")
_MAX_BURST = 32  # SSE events per write at most, so a long backlog still streams
_SSE_HEADERS: RawHeaders = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


class CompletionsEndpoints:
    """ASGI middleware: serves the two completion endpoints, passes everything else to ``app``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = ENDPOINTS.get(_route_path(scope)) if scope["type"] == "http" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            error = GatewayError("Method Not Allowed")
            error.status_code, error.error_type = 405, "invalid_request_error"
            await _send_json(send, 405, error.to_dict(), [(b"allow", b"POST")])
            return
        services: Services = scope["app"].state.services
        await generate(services, endpoint, scope, receive, send)


def _route_path(scope: Scope) -> str:
    """The path as the app's routes see it: without the ``root_path`` a proxy or mount put in front."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def make_generation(upstream: EngineClient, ctx: RequestContext, *, vllm: bool) -> AnyGeneration:
    if is_ensemble(ctx):
        return EnsembleGeneration(upstream, ctx, vllm=vllm)
    return Generation(upstream, ctx, vllm=vllm)


class _ClientGone(Exception):
    """The client disconnected before its request body arrived."""


async def generate(services: Services, endpoint: Endpoint, scope: Scope, receive: Receive, send: Send) -> None:
    metrics = services.metrics
    request_id = _request_id(scope)
    id_header = [(b"x-request-id", request_id.encode())]
    started = time.monotonic()
    route_name, policy = UNKNOWN_ROUTE, UNKNOWN_POLICY
    ticket: Ticket | None = None
    try:
        principal = services.auth.authenticate(_text_header(scope, b"authorization"))
        ticket = services.admission.admit()
        body = parse_json_body(await _read_body(scope, receive, services.settings.max_request_bytes))
        req = validate_request(endpoint, body)
        route = services.route_for(req.model)
        route_name = route.name
        services.auth.authorize(principal, route.name)
        check_prompt_size(req, services.settings.max_prompt_chars)
        ticket.enter_route(route)
        item = services.control.match(route, req)
        ctx = RequestContext(
            endpoint,
            req,
            route,
            request_id,
            max_n=services.settings.max_n,
            controlled=services.control.controlled(route),
        )
        gen = make_generation(services.upstream, ctx, vllm=services.settings.upstream_is_vllm)
        policy = gen.policy_name
        if req.stream:
            chunks = gen.chunks()
            first = await _first(chunks)  # an engine refusal still gets a real HTTP status
            relay = _Relay(send, gen, services, started, item, ticket)
            ticket = None  # the relay releases it when the stream ends
            await _with_cancellation(receive, relay.run(first, chunks, _SSE_HEADERS + id_header))
            return
        result = await _with_cancellation(receive, _collect(gen, endpoint))
        if result is None:
            return  # the client left; nobody would read an answer
        _record(services, gen, 200, started)
        _finished(services, gen, item, choice_text(result))
        status, payload = 200, result
    except _ClientGone:
        return
    except GatewayError as exc:
        if isinstance(exc, UpstreamError):
            metrics.upstream_errors.labels(exc.kind).inc()
        metrics.requests.labels(route_name, policy, "error", str(exc.status_code)).inc()
        id_header += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers.items()]
        status, payload = exc.status_code, exc.to_dict()
    except Exception:
        log.exception("unhandled error on %s %s", scope["method"], scope["path"])
        status, payload = 500, internal_error().to_dict()
    finally:
        # Before the answer goes out: a client that has its answer finds the place free.
        if ticket is not None:
            ticket.release()
    await _send_json(send, status, payload, id_header)


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


def _request_id(scope: Scope) -> str:
    """The client's ``x-request-id`` if it is sane, else a fresh one."""
    given = _header(scope, b"x-request-id")
    if given is not None:
        text = given.decode("latin-1")
        if _REQUEST_ID.match(text):
            return text
    return uuid.uuid4().hex


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def _text_header(scope: Scope, name: bytes) -> str | None:
    value = _header(scope, name)
    return None if value is None else value.decode("latin-1")


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    declared = _header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The request body is {declared.decode()} bytes; the limit is {limit}.")
    data = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        piece: bytes = message.get("body", b"")
        data = data + piece if data else piece  # usually one message: no copy
        if len(data) > limit:
            raise PayloadTooLarge(f"The request body exceeds the limit of {limit} bytes.")
        if not message.get("more_body", False):
            return data


async def _send_json(send: Send, status: int, payload: Any, headers: RawHeaders) -> None:
    body = _json(payload).encode()
    head = [(b"content-length", str(len(body)).encode()), _JSON_TYPE, *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


async def _first(chunks: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    """Wait for the first chunk; close the generation if it fails (or we are cancelled)."""
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


class _Relay:
    """One streamed response: SSE events out, then the bookkeeping when the stream ends however it ends."""

    def __init__(
        self,
        send: Send,
        gen: AnyGeneration,
        services: Services,
        started: float,
        item: ReferenceItem | None,
        ticket: Ticket,
    ) -> None:
        self.send = send
        self.gen = gen
        self.services = services
        self.started = started
        self.item = item
        self.ticket = ticket

    async def run(self, first: dict[str, Any], chunks: AsyncIterator[dict[str, Any]], head: RawHeaders) -> None:
        """Send the stream's chunks as SSE events; an error becomes a last event; always end with [DONE].

        Chunks the engine sent in one burst (``gen.more_buffered``) go out in one
        write, up to ``_MAX_BURST`` of them: a chunk is never held back waiting
        for the engine, and a backlog costs one write, not one per chunk.
        """
        gen, send = self.gen, self.send
        code = 200
        completed = False
        texts = [choice_text(first)]
        pending = [sse.encode(first)]
        try:
            await send({"type": "http.response.start", "status": 200, "headers": head})
            if not gen.more_buffered:
                await _send_body(send, pending)
            async for chunk in chunks:
                texts.append(choice_text(chunk))
                pending.append(sse.encode(chunk))
                if not gen.more_buffered or len(pending) >= _MAX_BURST:
                    await _send_body(send, pending)
            completed = True
        except GatewayError as exc:
            code = exc.status_code
            if isinstance(exc, UpstreamError):
                self.services.metrics.upstream_errors.labels(exc.kind).inc()
            pending.append(sse.encode(exc.to_dict()))
        except Exception:
            code = 500
            log.exception("error while streaming request %s", gen.ctx.request_id)
            pending.append(sse.encode(internal_error().to_dict()))
        finally:
            # A client that leaves cancels us here: close the upstream (the engine
            # aborts) even though we are being cancelled.
            with anyio.CancelScope(shield=True):
                await chunks.aclose()  # type: ignore[attr-defined]
                _record(self.services, gen, code, self.started)
                self.ticket.release()
                if completed:
                    _finished(self.services, gen, self.item, "".join(texts))
                elif code == 200:  # the client left: its tokens count as live work, its partial text is no sample
                    _count_live(self.services, gen)
        pending.append(sse.DONE_EVENT)
        await send({"type": "http.response.body", "body": b"".join(pending), "more_body": False})


async def _send_body(send: Send, pending: list[bytes]) -> None:
    body = pending[0] if len(pending) == 1 else b"".join(pending)
    pending.clear()
    await send({"type": "http.response.body", "body": body, "more_body": True})


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
    """Count the request in the metrics; a metric update never fails the request it counts."""
    acc = gen.accounting
    try:
        services.metrics.request_done(
            gen.ctx.route.name,
            gen.policy_name,
            "error" if code >= 400 else acc.stop_reason or "finished",
            code,
            prompt=acc.prompt,
            completion=acc.main,
            probe=acc.probe,
            forced=acc.forced,
            duration_s=time.monotonic() - started,
            ttft_s=None if acc.first_token_at is None else acc.first_token_at - started,
            probe_durations=gen.probes.stats.durations if gen.probes is not None else (),
        )
    except Exception:
        log.exception("recording metrics failed for request %s", gen.ctx.request_id)


async def _with_cancellation(receive: Receive, work: Awaitable[T]) -> T | None:
    """Run the work, cancelled if the client leaves first (as vLLM's ``with_cancellation``).

    The work runs in this task and a watcher task waits for the disconnect: one
    task per request rather than two and an ``asyncio.wait``. The watcher cancels
    this task only while the work runs, and that cancellation is told apart from
    any other (server shutdown) with ``uncancel``, as ``asyncio.timeout`` does.
    Returns None when the client left, after the work's cleanup has run.
    """
    this = asyncio.current_task()
    assert this is not None
    state = _Watch()

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not state.finished:
            state.client_left = True
            this.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        result = await work
        state.finished = True
        return result
    except (asyncio.CancelledError, GatewayError):
        if state.client_left and this.uncancel() == 0:
            return None
        raise
    finally:
        state.finished = True
        watcher.cancel()


class _Watch:
    __slots__ = ("finished", "client_left")

    def __init__(self) -> None:
        self.finished = False
        self.client_left = False
