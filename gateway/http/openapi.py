"""What the OpenAPI schema says about the endpoints that read their body by hand.

The completion and admin handlers parse their own bodies (so every error is
ours, in OpenAI's shape), which leaves FastAPI nothing to describe. These
helpers describe the bodies and the error responses, so the schema at
``/openapi.json`` is complete enough for clients and for schemathesis
(``tests/test_schema_fuzz.py``) to check the gateway against it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel

REF = "#/components/schemas/{model}"


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """OpenAI's error schema: every error the gateway returns."""

    error: ErrorDetail


_WHY = {
    400: "Invalid request (the message and `param` name the problem)",
    401: "Missing or invalid key",
    403: "The key may not use this route",
    404: "Unknown model, route or endpoint",
    413: "Request body too large",
    429: "Too many requests in flight; retry after `Retry-After` seconds",
    502: "The engine failed",
    503: "No engine reachable, or the gateway is shutting down",
    504: "The engine did not answer in time",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody, "description": _WHY[code]} for code in codes}


def json_body(model: type[BaseModel] | dict[str, Any], *, required: bool = True) -> dict[str, Any]:
    """``openapi_extra`` for a JSON request body described by a pydantic model (or a raw schema)."""
    schema = model if isinstance(model, dict) else {"$ref": REF.format(model=model.__name__)}
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": schema}}}}


def text_body(media_type: str) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {media_type: {"schema": {"type": "string"}}}}}


def install(app: FastAPI, *models: type[BaseModel], model_names: list[str] | None = None) -> None:
    """Add ``models`` (and what they refer to) to the schema's components.

    ``model_names``: the names a request's ``model`` may take on this gateway (its routes and aliases).
    """

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                schema = model.model_json_schema(ref_template=REF)
                schemas.update(schema.pop("$defs", {}))
                if model_names and "model" in schema.get("properties", {}):
                    schema["properties"]["model"] = {"type": "string", "enum": sorted(model_names)}
                schemas[model.__name__] = schema
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


ADMIN_PREFIX = "/admin"


def public_schema(spec: dict[str, Any]) -> dict[str, Any]:
    """The schema without the admin operations: what a caller without the admin key may read (issue 14)."""
    paths = {p: ops for p, ops in spec.get("paths", {}).items() if not p.startswith(ADMIN_PREFIX)}
    return {**spec, "paths": paths}


def serve_schema(app: FastAPI, *, is_admin: Callable[[Request], bool], docs: bool) -> None:
    """``/openapi.json`` (admin operations only for the admin key) and, if ``docs``, ``/docs`` and ``/redoc``.

    Build the app with ``openapi_url=None, docs_url=None, redoc_url=None`` so FastAPI serves none of them itself.
    """

    @app.get("/openapi.json", include_in_schema=False)
    async def schema(request: Request) -> JSONResponse:
        spec = app.openapi()
        return JSONResponse(spec if is_admin(request) else public_schema(spec))

    if docs:

        @app.get("/docs", include_in_schema=False)
        async def swagger() -> HTMLResponse:
            return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")

        @app.get("/redoc", include_in_schema=False)
        async def redoc() -> HTMLResponse:
            return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")
