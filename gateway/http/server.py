"""The uvicorn server the gateway runs under: its config (`stopgate serve`) and a server in a thread (demo, tests)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from gateway.engine.embedded import free_port
from gateway.http.guard import ConnectionLimits, effective_max_connections, guarded_protocol
from gateway.settings import Settings

log = logging.getLogger("stopgate")


def connection_limits(settings: Settings) -> ConnectionLimits:
    """The HTTP server's limits (gateway/http/guard.py), per process (each has its own descriptors)."""
    return ConnectionLimits(
        max_header_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers,
        header_timeout_s=settings.header_timeout_s,
        max_connections=effective_max_connections(
            settings.max_connections, upstream_connections=settings.max_upstream_connections
        ),
    )


def event_loop() -> str:
    """uvloop where it is installed (``uvicorn[standard]``), else the stdlib loop.

    Both notice every client that leaves (tests/test_faults.py runs each): the completion endpoints cancel
    their work with ``Task.cancel`` (gateway/http/endpoints.py). An anyio cancel scope, as Starlette's
    ``StreamingResponse`` uses, is not enough under uvloop: it skips a task whose awaited future is
    already done, and uvloop runs I/O callbacks before the ready queue, so a task fed by a steady engine
    stream always looked about to wake and its cancellation waited for its next request.
    """
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def server_config(app: Any, settings: Settings, *, host: str | None = None, port: int | None = None) -> uvicorn.Config:
    """The uvicorn config ``stopgate serve`` runs ``app`` with (``host`` and ``port`` default to the settings')."""
    limits = connection_limits(settings)
    if settings.max_connections and limits.max_connections < settings.max_connections:
        log.warning("max_connections lowered to %d to stay below the descriptor limit", limits.max_connections)
    # No access log: Prometheus counts requests, and a log line per request costs CPU.
    return uvicorn.Config(
        app,
        host=settings.host if host is None else host,
        port=settings.port if port is None else port,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=int(settings.drain_timeout_s) or None,
        # Above the clients' pool expiry (see the setting): uvicorn's default of 5 s equals httpx's.
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]  # uvicorn types it int
        loop=event_loop(),
        # httptools with header, timeout and connection limits and one write per loop turn
        # (gateway/http/guard.py); no `server: uvicorn`.
        http=guarded_protocol(limits),
        server_header=False,
    )


@contextmanager
def serve_in_thread(app: Any, *, port: int | None = None, settings: Settings | None = None) -> Iterator[str]:
    """Yield the base URL while ``app`` is served; shut it down afterwards.

    With ``settings``, the server is configured as ``stopgate serve`` configures it (``server_config``);
    without, it runs the same HTTP protocol with its default limits and keep-alive.
    """
    port = port or free_port()
    if settings is not None:
        quiet = settings.model_copy(update={"log_level": "warning"})
        config = server_config(app, quiet, host="127.0.0.1", port=port)
    else:
        # The protocol `stopgate serve` runs, so tests exercise it, with its automatic connection cap (below the
        # descriptor limit): a test peer such as the fake engine takes every connection a gateway opens to it.
        automatic = effective_max_connections(0, upstream_connections=0)
        http = guarded_protocol(ConnectionLimits(max_connections=automatic))
        keep_alive = Settings.model_fields["keep_alive_timeout_s"].default
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", http=http)
        config.timeout_keep_alive = keep_alive
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the in-thread server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
