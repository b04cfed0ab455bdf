"""``POST /v1/responses``: the Responses API (the OpenAI Agents SDK's), passed through to the engine.

The same front door as the completion endpoints: authentication and the
route's key scope, admission (in-flight limits, draining), the body and
prompt size limits, ``max_output_tokens`` against the route's limit, the
request id (sent to the engine, returned in ``x-request-id``), and the
request metrics. The gateway always streams from the engine; a streaming
client gets the engine's events as they come (``event:`` names kept, no
``[DONE]``, as OpenAI sends them), a non-streaming one the response object
of the final event.

Engine-side state is off unless ``responses_stateful`` is set: ``background:
true`` would leave the engine generating after the admission ticket is
released, and ``previous_response_id`` / ``conversation`` name engine state
that is not scoped to the API key that made it (one tenant could continue
another's response). Those fields are then 400s, and ``store`` is forced to
false so no response is kept to be named later.

There is no early stopping here: the Responses event stream is another
wire format, and stopping on it would take a second stop implementation.
A request that asks for stopping settings is a 400 that says so; chat
completions serve the same model with early stopping.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from gateway.engine.client import RESPONSE_END_EVENTS
from gateway.errors import GatewayError, InvalidRequest, LimitExceeded, UpstreamError
from gateway.http.admission import Ticket
from gateway.http.api import _services, _with_cancellation, read_body, request_id_of
from gateway.http.openapi import errors, json_body
from gateway.http.services import Services
from gateway.metrics import UNKNOWN_POLICY, UNKNOWN_ROUTE
from gateway.openai.fields import GATEWAY_FIELDS, MAX_LOGPROBS
from gateway.openai.protocol import PositiveInt, parse_json_body
from gateway.openai.sse import EventStreamResponse
from gateway.settings import RouteConfig

router = APIRouter()
PATH = "/v1/responses"
POLICY = "none"  # the metric label: nothing stops these early


class ResponsesRequest(BaseModel):
    """The fields the gateway acts on; the rest goes to the engine as sent."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    input: str | list[Any]
    instructions: str | None = None
    stream: StrictBool = False
    max_output_tokens: PositiveInt | None = None


def _validate(body: dict[str, Any]) -> ResponsesRequest:
    if "stopgate" in body:
        raise InvalidRequest(
            "Early stopping is not available on /v1/responses (a pass-through); use /v1/chat/completions.",
            param="stopgate",
        )
    try:
        return ResponsesRequest.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = str(err["loc"][0]) if err["loc"] else None
        raise InvalidRequest(f"Invalid value for '{param}': {err['msg']}.", param=param) from exc


STATEFUL = ("previous_response_id", "conversation")


def _stateless(body: dict[str, Any], allowed: bool) -> dict[str, Any]:
    """The body with engine-side state refused (400 naming the field) and ``store`` off, unless allowed."""
    if allowed:
        return body
    if body.get("background") is True:
        raise InvalidRequest(
            "background responses are not served here (responses_stateful is off); stream instead.",
            param="background",
        )
    for name in STATEFUL:
        if body.get(name) is not None:
            raise InvalidRequest(
                f"'{name}' is not served here (responses_stateful is off); send the whole input.", param=name
            )
    return {**body, "store": False}


def _check_sizes(req: ResponsesRequest, route: RouteConfig, max_prompt_chars: int) -> int:
    """The prompt against ``max_prompt_chars``; the output tokens the engine may generate."""
    # Characters, as for a string input: ensure_ascii would count each non-ASCII character as a 6-char escape.
    size = len(req.input) if isinstance(req.input, str) else len(json.dumps(req.input, ensure_ascii=False))
    size += len(req.instructions or "")
    if size > max_prompt_chars:
        raise LimitExceeded(
            f"The input has {size} characters; the limit is {max_prompt_chars} (max_prompt_chars).", param="input"
        )
    if req.max_output_tokens is None:
        return route.default_max_tokens
    if req.max_output_tokens > route.max_tokens_limit:
        raise LimitExceeded(
            f"max_output_tokens={req.max_output_tokens} exceeds the limit of {route.max_tokens_limit} "
            f"for model '{req.model}'.",
            param="max_output_tokens",
        )
    return req.max_output_tokens


def _check_engine_fields(body: dict[str, Any]) -> None:
    """The engine fields completions bound (gateway/openai/fields.py) are bounded here too (issue 14)."""
    for name in sorted(GATEWAY_FIELDS & set(body)):
        raise InvalidRequest(f"'{name}' is set by the gateway, not by clients.", param=name)
    top = body.get("top_logprobs")
    if top is not None and (not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_LOGPROBS):
        raise InvalidRequest(f"'top_logprobs' must be an integer in [0, {MAX_LOGPROBS}].", param="top_logprobs")


RESPONSES_EVENT: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "event": {"type": "string", "description": "The event's type, e.g. response.output_text.delta"},
        "data": {"type": "string", "description": "The event as JSON (no [DONE] ends this stream)"},
    },
}
DOCUMENTED: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The response object (JSON), or its events (text/event-stream) with `stream`",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "text/event-stream": {"schema": RESPONSES_EVENT},
        },
    },
    **errors(400, 401, 403, 404, 413, 429, 502, 503, 504),
}


@router.post(PATH, responses=DOCUMENTED, openapi_extra=json_body(ResponsesRequest))
async def responses(request: Request) -> Response:
    services = _services(request)
    request_id = request_id_of(request)
    headers = {"x-request-id": request_id}
    started = time.monotonic()
    route_name = UNKNOWN_ROUTE
    ticket: Ticket | None = None
    try:
        principal = services.auth.authenticate(request.headers.get("authorization"))
        ticket = services.admission.admit(principal)  # the key's share of max_in_flight, as on completions
        body = parse_json_body(await read_body(request, services.settings.max_request_bytes))
        req = _validate(body)
        body = _stateless(body, services.settings.responses_stateful)
        _check_engine_fields(body)
        route = services.route_for(req.model)
        route_name = route.name
        services.auth.authorize(principal, route.name)
        max_output = _check_sizes(req, route, services.settings.max_prompt_chars)
        ticket.enter_route(route)
        upstream = {**body, "model": route.upstream_model, "stream": True, "max_output_tokens": max_output}
        events = _events(services, upstream, request_id, req.model)
        if req.stream:
            first = await _first(events)
            stream = _sse(first, events, services, route.name, started, ticket)
            ticket = None  # the stream releases it when it ends
            return EventStreamResponse(stream, headers=headers)
        final = await _with_cancellation(request, _final(events))
        if final is None:
            return Response(status_code=499)  # the client left
        _record(services, route.name, 200, started, final)
        return JSONResponse(final, headers=headers)
    except GatewayError as exc:
        if isinstance(exc, UpstreamError):
            services.metrics.upstream_errors.labels(exc.kind).inc()
        policy = POLICY if route_name != UNKNOWN_ROUTE else UNKNOWN_POLICY
        services.metrics.requests.labels(route_name, policy, "error", str(exc.status_code)).inc()
        return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers={**headers, **exc.headers})
    finally:
        if ticket is not None:
            ticket.release()


async def _events(
    services: Services, body: dict[str, Any], request_id: str, model: str
) -> AsyncIterator[dict[str, Any]]:
    """The engine's events, with the client's model name in the response objects."""
    async with services.upstream.stream(PATH, body, request_id=request_id) as stream:
        async for event in stream:
            response = event.get("response")
            if isinstance(response, dict) and "model" in response:
                response["model"] = model
            yield event


async def _first(events: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    """The first event, so an engine refusal still gets a real HTTP status."""
    try:
        return await events.__anext__()
    except BaseException:
        with anyio.CancelScope(shield=True):
            await events.aclose()  # type: ignore[attr-defined]
        raise


async def _final(events: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    """The response object of the final event (a non-streaming client's answer)."""
    try:
        async for event in events:
            if event.get("type") in RESPONSE_END_EVENTS and isinstance(event.get("response"), dict):
                response: dict[str, Any] = event["response"]
                return response
    finally:
        with anyio.CancelScope(shield=True):
            await events.aclose()  # type: ignore[attr-defined]
    raise UpstreamError("The upstream engine's response stream ended without a final response.")


def _encode(event: dict[str, Any]) -> bytes:
    data = json.dumps(event, separators=(",", ":"))
    kind = event.get("type")
    head = f"event: {kind}\n" if isinstance(kind, str) and kind.isprintable() and "\n" not in kind else ""
    return f"{head}data: {data}\n\n".encode()


async def _sse(
    first: dict[str, Any],
    events: AsyncIterator[dict[str, Any]],
    services: Services,
    route: str,
    started: float,
    ticket: Ticket,
) -> AsyncIterator[bytes]:
    code, final = 200, None
    try:
        event = first
        while True:
            if event.get("type") in RESPONSE_END_EVENTS:
                final = event.get("response")
            yield _encode(event)
            try:
                event = await events.__anext__()
            except StopAsyncIteration:
                break
    except GatewayError as exc:
        code = exc.status_code
        if isinstance(exc, UpstreamError):
            services.metrics.upstream_errors.labels(exc.kind).inc()
        yield _encode({"type": "error", **exc.to_dict()})
    finally:
        with anyio.CancelScope(shield=True):  # a client that left cancels us: still close the engine's stream
            await events.aclose()  # type: ignore[attr-defined]
            _record(services, route, code, started, final if isinstance(final, dict) else None)
            ticket.release()


def _record(services: Services, route: str, code: int, started: float, response: dict[str, Any] | None) -> None:
    m = services.metrics
    m.requests.labels(route, POLICY, "error" if code >= 400 else "finished", str(code)).inc()
    m.request_duration.labels(route).observe(time.monotonic() - started)
    usage = (response or {}).get("usage")
    if isinstance(usage, dict):
        m.tokens.labels(route, "prompt").inc(int(usage.get("input_tokens") or 0))
        m.tokens.labels(route, "completion").inc(int(usage.get("output_tokens") or 0))
