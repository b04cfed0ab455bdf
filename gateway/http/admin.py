"""The admin API: read and steer each route's controller, upload reference sets.

Off unless ``admin_key`` is set. Every path under ``/admin`` first checks the
key (``Authorization: Bearer <key>`` or ``x-admin-key``), so a caller without
it gets 401 whether or not the path exists: nothing about the admin surface
leaks. Bad input is a 400 that names the field, and changes nothing.

    GET  /admin/routes                          every route's state
    GET  /admin/routes/{route}                  budget, strictness, EM window + Wilson interval,
                                                samples by source, evaluation share used
    POST /admin/routes/{route}/freeze           stop the controller moving (and /unfreeze)
    PUT  /admin/routes/{route}/budget           {"budget": 96}: an operator's override
    PUT  /admin/routes/{route}/target           {"target": 0.9}
    PUT  /admin/routes/{route}/references/{name}  a JSONL reference set (the body), validated whole
    DELETE /admin/routes/{route}/references/{name}  remove a reference set (also one from the routes file)
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gateway.control.plane import ControlPlane
from gateway.errors import InvalidRequest, NotFound, PayloadTooLarge, Unauthorized
from gateway.evaluation import ReferenceSetError
from gateway.http.api import read_body
from gateway.http.auth import bearer_token
from gateway.http.openapi import errors, json_body, text_body
from gateway.openai.protocol import parse_json_body

router = APIRouter(prefix="/admin", responses=errors(401, 404))

# Reference uploads may be larger than a chat request (counted as the body streams in, chunked or not),
# and may take longer to arrive: UPLOAD_TIMEOUT_FACTOR x body_timeout_s.
MAX_UPLOAD_BYTES = 64 * 1024 * 1024
UPLOAD_TIMEOUT_FACTOR = 10
MAX_JSON_BYTES = 1_000_000


def _plane(request: Request) -> ControlPlane:
    """The control plane, once the caller has shown the admin key."""
    services = request.app.state.services
    key = services.settings.admin_key
    if key is None:
        raise NotFound("Not Found")
    if not has_admin_key(request, key.get_secret_value()):
        raise Unauthorized("A valid admin key is required (Authorization: Bearer <key>).", code="invalid_admin_key")
    plane: ControlPlane = services.control
    return plane


def has_admin_key(request: Request, key: str) -> bool:
    """Whether the request shows ``key``: ``Authorization: Bearer`` parsed as for clients, or ``x-admin-key``."""
    auth = request.headers.get("authorization")
    given = bearer_token(auth) or request.headers.get("x-admin-key", "")
    return hmac.compare_digest(given.encode(), key.encode())


async def _json(request: Request) -> dict[str, Any]:
    settings = request.app.state.services.settings
    return parse_json_body(await read_body(request, MAX_JSON_BYTES, settings.body_timeout_s))


def _number(body: dict[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
    if isinstance(value, bool) or not ok:
        raise InvalidRequest(f"'{name}' must be {'an integer' if kind is int else 'a number'}.", param=name)
    return value


@router.get("/routes")
async def list_routes(request: Request) -> dict[str, Any]:
    plane = _plane(request)
    return {"routes": [plane.snapshot(name) for name in plane.routes]}


@router.get("/routes/{route}")
async def get_route(request: Request, route: str) -> dict[str, Any]:
    return _plane(request).snapshot(route)


@router.post("/routes/{route}/freeze", responses=errors(400))
async def freeze(request: Request, route: str) -> dict[str, Any]:
    return await _plane(request).freeze(route, True)


@router.post("/routes/{route}/unfreeze", responses=errors(400))
async def unfreeze(request: Request, route: str) -> dict[str, Any]:
    return await _plane(request).freeze(route, False)


@router.put(
    "/routes/{route}/budget",
    responses=errors(400, 413),
    openapi_extra=json_body({"type": "object", "properties": {"budget": {"type": "integer"}}, "required": ["budget"]}),
)
async def set_budget(request: Request, route: str) -> dict[str, Any]:
    plane = _plane(request)
    return await plane.set_budget(route, _number(await _json(request), "budget", int))


@router.put(
    "/routes/{route}/target",
    responses=errors(400, 413),
    openapi_extra=json_body({"type": "object", "properties": {"target": {"type": "number"}}, "required": ["target"]}),
)
async def set_target(request: Request, route: str) -> dict[str, Any]:
    plane = _plane(request)
    return await plane.set_target(route, float(_number(await _json(request), "target", float)))


@router.put("/routes/{route}/references/{name}", responses=errors(400, 413), openapi_extra=text_body("text/plain"))
async def upload_references(request: Request, route: str, name: str) -> dict[str, Any]:
    plane = _plane(request)
    timeout_s = UPLOAD_TIMEOUT_FACTOR * request.app.state.services.settings.body_timeout_s
    try:
        raw = await read_body(request, MAX_UPLOAD_BYTES, timeout_s)
    except PayloadTooLarge as exc:
        raise PayloadTooLarge(f"The reference set is too large: {exc.message}") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"The reference set is not UTF-8 (byte {exc.start}).", param="body") from exc
    del raw
    try:
        # Parsing and validating tens of MB takes seconds: off the event loop (ControlPlane.upload), one at a time.
        async with plane.upload_lock:
            return await plane.upload(route, name, text)
    except ReferenceSetError as exc:
        raise InvalidRequest(f"The reference set was rejected, nothing was loaded:\n{exc}", param="body") from exc


@router.delete("/routes/{route}/references/{name}")
async def delete_references(request: Request, route: str, name: str) -> dict[str, Any]:
    return await _plane(request).delete_references(route, name)


@router.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
async def unknown(request: Request, rest: str) -> JSONResponse:
    """Any other admin path: 401 without the key (so nothing leaks), 404 with it."""
    _plane(request)
    raise NotFound(f"No admin endpoint {request.method} /admin/{rest}.")
