"""``POST /v1/completions`` and ``/v1/chat/completions`` as raw ASGI, in front of FastAPI.

These two endpoints carry all the traffic, so they skip FastAPI's route
machinery (routing, dependency solving, exception middleware, a send wrapper
per chunk) and ``StreamingResponse`` (a task group per response): on the
2-core benchmark box that framework path cost more CPU per request and per
chunk than the gateway's own work. The handler stays thin all the same: it
reads the body and picks JSON or SSE; ``gateway.completions.Completion`` does
everything between. Every other route stays with FastAPI; gateway/http/api.py
declares these two paths too, so the OpenAPI schema describes them, but their
requests never reach FastAPI's routing. What a client sees (status, headers,
JSON bytes, events) is what the FastAPI handler sent.

A client that leaves cancels the work, as vLLM's ``with_cancellation`` does:
the session's cleanup closes the upstream stream, and the engine aborts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Awaitable
from typing import Any, TypeVar

import anyio
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.completions import Completion
from gateway.errors import ClientClosed, GatewayError, PayloadTooLarge, RequestTimeout, internal_error
from gateway.http.guard import CONNECTION_LOST
from gateway.http.services import Services
from gateway.openai import sse
from gateway.openai.protocol import Endpoint, parse_json_body

log = logging.getLogger("stopgate")

T = TypeVar("T")
RawHeaders = list[tuple[bytes, bytes]]

ENDPOINTS: dict[str, Endpoint] = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_JSON_TYPE = (b"content-type", b"application/json")
_SSE_HEADERS: RawHeaders = [(b"cache-control", b"no-cache"), (b"content-type", b"text/event-stream; charset=utf-8")]


class CompletionsEndpoints:
    """ASGI middleware: serves the two completion endpoints, passes everything else to ``app``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = ENDPOINTS.get(route_path(scope)) if scope["type"] == "http" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":  # as FastAPI answers a method the route lacks
            error = GatewayError("Method Not Allowed")
            error.status_code, error.error_type = 405, "invalid_request_error"
            await _send_json(send, 405, error.to_dict(), [(b"allow", b"POST")])
            return
        services: Services = scope["app"].state.services
        await generate(services, endpoint, scope, receive, send)


def route_path(scope: Scope) -> str:
    """The path as the app's routes see it: without the ``root_path`` a proxy or mount put in front."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


async def generate(services: Services, endpoint: Endpoint, scope: Scope, receive: Receive, send: Send) -> None:
    """One completion: JSON or SSE, or an OpenAI error with its status and headers."""
    request_id = _request_id(scope)
    id_header = [(b"x-request-id", request_id.encode())]
    completion = Completion(services, endpoint, request_id)
    started = False  # the response has begun: an error now can only be an event
    try:
        completion.admit(_text_header(scope, b"authorization"))
        settings = services.settings
        body = parse_json_body(await read_body(scope, receive, settings.max_request_bytes, settings.body_timeout_s))
        session = completion.open(body)
        if session.ctx.request.stream:

            async def stream() -> None:
                nonlocal started
                first = await completion.first()  # an engine refusal still gets its HTTP status
                started = True
                await _relay(send, completion, first, id_header + _SSE_HEADERS)

            await _with_cancellation(scope, receive, stream())
            return  # streamed, or the client left (nobody reads a 499)
        result = await _with_cancellation(scope, receive, completion.collect())
        if result is not None:
            await _send_json(send, 200, result, id_header)
    except GatewayError as exc:
        if started:
            raise
        completion.failed(exc)
        headers = id_header + [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers.items()]
        await _send_json(send, exc.status_code, exc.to_dict(), headers)
    except Exception:
        if started:
            raise
        # As the app's last-resort handler answers: logged, a 500 in OpenAI's shape.
        log.exception("unhandled error on %s %s", scope["method"], scope["path"])
        await _send_json(send, 500, internal_error().to_dict(), [])
    finally:
        completion.close()


async def read_body(scope: Scope, receive: Receive, limit: int, timeout_s: float | None = None) -> bytes:
    """The body, counted against ``limit`` as it streams in, within ``timeout_s`` (408 past it)."""
    declared = _header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The request body is {declared.decode()} bytes; the limit is {limit}.")
    data = b""
    try:
        # asyncio's own timeout, not anyio's: this runs once per request, and anyio's cancel scope cost 3% of a
        # worker's CPU at one token.
        async with asyncio.timeout(timeout_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientClosed("The client closed the connection while sending its request body.")
                piece: bytes = message.get("body", b"")
                data = data + piece if data else piece  # usually one message: no copy
                if len(data) > limit:
                    raise PayloadTooLarge(f"The request body exceeds the limit of {limit} bytes.")
                if not message.get("more_body", False):
                    return data
    except TimeoutError as exc:
        raise RequestTimeout(f"The request body did not arrive within {timeout_s:g} s (body_timeout_s).") from exc


def _request_id(scope: Scope) -> str:
    """The client's ``x-request-id`` if it is sane, else a fresh one."""
    given = _header(scope, b"x-request-id")
    if given is not None:
        text = given.decode("latin-1")
        if _REQUEST_ID.match(text):
            return text
    return os.urandom(16).hex()  # a uuid4 hex's length and alphabet, at a third of its cost


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def _text_header(scope: Scope, name: bytes) -> str | None:
    value = _header(scope, name)
    return None if value is None else value.decode("latin-1")


async def _send_json(send: Send, status: int, payload: Any, headers: RawHeaders) -> None:
    body = sse.dumps(payload)  # the compact UTF-8 JSON Starlette's JSONResponse writes, through msgspec
    head = [*headers, (b"content-length", str(len(body)).encode()), _JSON_TYPE]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


async def _relay(send: Send, completion: Completion, first: dict[str, Any], head: RawHeaders) -> None:
    """The SSE response: the head, then ``Completion.stream``'s writes, the last one ending the body.

    The stream's own ``finally`` (close upstream, metrics, ticket, bookkeeping) runs however it ends: to its
    end, or closed here when the client leaves during a write.
    """
    events = completion.stream(first)
    done = False
    try:
        await send({"type": "http.response.start", "status": 200, "headers": head})
        async for body, more in events:
            await send({"type": "http.response.body", "body": body, "more_body": more})
        # No break at the last write: the generator runs to its end here. (Left suspended at its last yield,
        # it would be closed by the event loop's finalizer: a task per request.)
        done = True
    finally:
        if not done:  # cancelled (the client left) or failed while writing: the stream's cleanup runs now
            with anyio.CancelScope(shield=True):
                await events.aclose()


async def _with_cancellation(scope: Scope, receive: Receive, work: Awaitable[T]) -> T | None:
    """Run the work, cancelled if the client leaves first (as vLLM's ``with_cancellation``).

    The work runs in this task. Under ``stopgate serve``'s own protocol (gateway/http/guard.py) a callback
    on the connection's lost-future cancels it; under any other server a watcher task waits for
    ``receive()`` to say ``http.disconnect``. Either cancels this task only while the work runs (the
    finished guard), and that cancellation is told apart from any other (server shutdown) with
    ``uncancel``, as ``asyncio.timeout`` does. Returns None when the client left, after the work's
    cleanup has run. (The callback saves a task per request: its creation, its first step and its
    cancellation.)
    """
    this = asyncio.current_task()
    assert this is not None
    state = _Watch()

    def left(_: object = None) -> None:
        if not state.finished:
            state.client_left = True
            this.cancel()

    lost: asyncio.Future[None] | None = (scope.get("extensions") or {}).get(CONNECTION_LOST)
    watcher: asyncio.Future[None] | None = None
    if lost is not None:
        lost.add_done_callback(left)  # already lost: the callback runs on the next loop turn
    else:

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            left()

        watcher = asyncio.ensure_future(watch())
    try:
        result = await work
        state.finished = True  # no await between the work's last send and here
        return result
    except (asyncio.CancelledError, GatewayError):
        if state.client_left and this.uncancel() == 0:
            return None
        raise
    finally:
        state.finished = True
        if watcher is not None:
            watcher.cancel()
        elif lost is not None:
            lost.remove_done_callback(left)


class _Watch:
    __slots__ = ("finished", "client_left")

    def __init__(self) -> None:
        self.finished = False
        self.client_left = False
