"""The application factory. The lifespan owns the resources; nothing runs at import."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.control.fleet import Fleet, join_fleet
from gateway.control.plane import ControlPlane
from gateway.control.store import Store
from gateway.control.stores import open_store
from gateway.engine.client import Upstream
from gateway.engine.pool import UpstreamPool
from gateway.errors import GatewayError, InvalidRequest, internal_error
from gateway.evaluation.sampler import Sampler
from gateway.http import openapi
from gateway.http.admin import has_admin_key
from gateway.http.admin import router as admin_router
from gateway.http.admission import Admission, per_worker
from gateway.http.api import router
from gateway.http.auth import build_authenticator
from gateway.http.endpoints import CompletionsEndpoints
from gateway.http.guard import rate_limited_exception_handler
from gateway.http.responses import ResponsesRequest
from gateway.http.responses import router as responses_router
from gateway.http.services import Services
from gateway.metrics import Metrics
from gateway.openai.protocol import ChatCompletionRequest, CompletionRequest
from gateway.settings import ConfigError, Settings
from gateway.stopping.runner import runner

log = logging.getLogger("stopgate")


def create_app(settings: Settings, *, registry: CollectorRegistry | None = None) -> FastAPI:
    """Build the gateway; ``registry`` takes its metrics (a fresh one per test)."""
    if settings.upstream_url is None:
        raise ConfigError("upstream_url: create_app needs an upstream; `stopgate serve` starts the embedded engine")
    routes = settings.load_routes()
    metrics = Metrics(registry)
    auth = build_authenticator(settings, {route.name for route in routes.routes})
    workers = settings.workers  # each worker admits its share of the gateway's limits
    admission = Admission(
        per_worker(settings.max_in_flight, workers),
        metrics,
        key_share=settings.key_share,
        shared=auth.keys > 1,
        workers=workers,
    )
    store = _open_store(settings)
    try:
        control = ControlPlane(settings, routes, store, metrics)
    except BaseException:
        store.close()
        raise
    # Replicas share Redis; the workers of one `serve --workers N` share the state file (or that Redis).
    fleet = join_fleet(control, settings, metrics) if settings.state_url or settings.workers > 1 else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        replicas = [
            Upstream(
                url,
                connect_timeout_s=settings.connect_timeout_s,
                read_timeout_s=settings.read_timeout_s,
                max_connections=settings.max_upstream_connections,
                transport=settings.engine_transport,
            )
            for url in settings.upstream_urls
        ]
        upstream = UpstreamPool(
            replicas,
            failures=settings.breaker_failures,
            cooldown_s=settings.breaker_cooldown_s,
            retries=settings.upstream_retries,
            total_timeout_s=settings.total_timeout_s,
        )
        run = runner(upstream, vllm=settings.upstream_is_vllm)
        sampler = Sampler(settings, control, metrics, run=run, in_flight=lambda: admission.total)
        app.state.services = Services(settings, routes, upstream, metrics, control, sampler, auth, admission)
        # The loop's own errors (e.g. accept() out of descriptors) are logged once per interval, not per try.
        asyncio.get_running_loop().set_exception_handler(rate_limited_exception_handler())
        canaries = asyncio.ensure_future(sampler.run_canaries())
        if fleet is not None:
            fleet.start()
        try:
            yield
        finally:
            canaries.cancel()
            await asyncio.gather(canaries, return_exceptions=True)
            await close_control(sampler, control, fleet)
            await upstream.aclose()

    app = FastAPI(title="stopgate", version="0.1.0", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.include_router(router)
    app.include_router(responses_router)
    app.include_router(admin_router)
    app.add_middleware(CompletionsEndpoints)  # the hot path, ahead of FastAPI's routing
    openapi.install(
        app, CompletionRequest, ChatCompletionRequest, ResponsesRequest, model_names=list(routes.by_model())
    )
    admin_key = settings.admin_key.get_secret_value() if settings.admin_key is not None else None
    openapi.serve_schema(
        app, is_admin=lambda r: admin_key is not None and has_admin_key(r, admin_key), docs=settings.api_docs
    )
    _install_error_handlers(app)
    return app


def _open_store(settings: Settings) -> Store:
    if settings.state_url is None and settings.workers > 1:
        from gateway.control.sqlite_log import SQLiteShared  # the workers' shared state file

        return SQLiteShared(settings.state_path)
    if settings.state_url is None:
        return open_store(settings.state_path)
    from gateway.control.redis_store import RedisStore  # redis is imported only when used

    return RedisStore(settings.state_url)


async def close_control(sampler: Sampler, control: ControlPlane, fleet: Fleet | None) -> None:
    """Shut the control plane down: evaluation runs first (their samples go to the fleet's buffer),
    then the fleet's last flush and lease hand-over, then the store."""
    await sampler.drain()
    if fleet is not None:
        await fleet.aclose()
    await control.aclose()


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=exc.headers or None)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in err["loc"][1:]) or None
        error = InvalidRequest(f"Invalid value for '{param}': {err['msg']}.", param=param)
        return JSONResponse(error.to_dict(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = GatewayError(str(exc.detail))
        error.status_code = exc.status_code
        error.error_type = "invalid_request_error" if exc.status_code < 500 else "internal_error"
        return JSONResponse(error.to_dict(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(internal_error().to_dict(), status_code=500)
