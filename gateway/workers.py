"""``stopgate serve --workers N``: N gateway processes on one port (issue 17).

The parent binds the port once, starts the embedded engine once (gateway/cli.py),
and runs uvicorn's supervisor (``uvicorn.supervisors.Multiprocess``), which
spawns N workers on the bound socket and starts a new one when a worker dies.
Each worker builds its own app from the parent's settings (``WorkerApp``, the
app factory, pickled into the worker). What a single process keeps in memory
holds across the workers as follows:

* **the controller**: the workers share one controller per route through the
  fleet (gateway/control/fleet.py): over the SQLite state file
  (gateway/control/sqlite_log.py) by default, over ``STOPGATE_STATE_URL``'s Redis
  when set. One worker holds a route's lease and folds every worker's samples,
  in order, exactly once; the others read the published state each
  ``state_refresh_s``. The evaluation share counts every worker's tokens and only
  the leader runs canaries, so both are global;
* **backpressure**: every in-flight limit holds per worker as ``ceil(limit / N)``
  (gateway/http/admission.py's ``per_worker``), so the gateway admits about the
  limit in all (the kernel spreads connections over the workers); so does
  ``eval_max_in_flight``, past which a worker sheds evaluation work;
* **metrics**: the parent points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh
  directory before it spawns the workers and removes it at exit; each worker's
  ``/metrics`` merges every worker's files (gateway/metrics.py), and the files of
  a worker the supervisor replaced are marked dead;
* **graceful drain**: SIGTERM to the parent reaches every worker, and each one
  stops admitting (503) and lets its requests finish, as a single process does.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from socket import socket
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from prometheus_client import multiprocess
from uvicorn.supervisors import Multiprocess

from gateway.http.admission import per_worker
from gateway.http.guard import guarded_protocol
from gateway.http.server import connection_limits, event_loop
from gateway.settings import Settings

log = logging.getLogger("stopgate")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# How long the supervisor waits for a worker to answer its health ping before it kills and replaces it.
# A new worker answers only once its imports are done: uvicorn's 5 s replaced workers over and over on a
# loaded two-core machine (load 16), never letting one start.
WORKER_HEALTHCHECK_S = 30


def start_draining(app: FastAPI, settings: Settings) -> None:
    """Readiness goes false and new requests get 503 while the ones in flight finish."""
    services = getattr(app.state, "services", None)
    if services is not None and not services.admission.draining:
        services.admission.draining = True
        log.info("draining: %d requests in flight, up to %.0f s", services.in_flight, settings.drain_timeout_s)


@dataclass(frozen=True)
class WorkerApp:
    """The app factory a worker calls (uvicorn's ``factory=True``); pickled into each spawned worker."""

    settings: Settings

    def __call__(self) -> FastAPI:
        from gateway.http.app import create_app

        # Evaluation is shed while this worker has its share of eval_max_in_flight live requests (the
        # admission limits divide themselves: gateway/http/admission.py).
        s = self.settings.model_copy(
            update={"eval_max_in_flight": per_worker(self.settings.eval_max_in_flight, self.settings.workers)}
        )
        logging.basicConfig(level=s.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("asyncio").setLevel(logging.ERROR)
        app = create_app(s)
        _drain_on_exit(app, s)
        gc.collect()  # what lives as long as the worker stays out of the cyclic collector (as in gateway/cli.py)
        gc.freeze()
        return app


def _drain_on_exit(app: FastAPI, settings: Settings) -> None:
    """Put draining in front of the uvicorn server's own SIGTERM/SIGINT handler in this worker.

    uvicorn builds the app (``Config.load``) inside ``Server.capture_signals``, so the handler found here
    is the server's ``handle_exit``; it is restored when the server stops."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if callable(previous):
            signal.signal(sig, _draining_handler(app, settings, previous))


def _draining_handler(
    app: FastAPI, settings: Settings, previous: Callable[[int, FrameType | None], Any]
) -> Callable[[int, FrameType | None], None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        start_draining(app, settings)
        previous(signum, frame)

    return handler


class WorkerConfig(uvicorn.Config):
    """uvicorn's config with the guarded HTTP protocol built in the worker (a class made at run time
    cannot be pickled into a spawned process, so the parent passes the settings instead)."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        self.settings = settings
        super().__init__(WorkerApp(settings), factory=True, http="httptools", **kwargs)

    def load(self) -> None:
        limits = connection_limits(self.settings)
        if self.settings.max_connections and limits.max_connections < self.settings.max_connections:
            log.warning("max_connections lowered to %d to stay below the descriptor limit", limits.max_connections)
        self.http = guarded_protocol(limits)
        super().load()


class Supervisor(Multiprocess):
    """uvicorn's supervisor; a worker it replaces has its live gauges marked dead in the metrics directory."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket], metrics_dir: str) -> None:
        super().__init__(config, sockets)
        self.metrics_dir = metrics_dir

    def keep_subprocess_alive(self) -> None:
        before = {p.pid for p in self.processes}
        super().keep_subprocess_alive()
        for pid in before - {p.pid for p in self.processes}:
            if pid is not None:
                multiprocess.mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]


def run_workers(settings: Settings) -> int:
    """Serve with ``settings.workers`` processes on one socket until SIGTERM/SIGINT; every worker drains."""
    if settings.state_url is None:  # create the shared state file once, before the workers race to
        from gateway.control.sqlite_log import SQLiteShared

        SQLiteShared(settings.state_path).close()
    metrics_dir = tempfile.mkdtemp(prefix="stopgate-metrics-")
    previous = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = metrics_dir  # the workers inherit it and import prometheus_client with it set
    try:
        config = WorkerConfig(
            settings,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_level=settings.log_level,
            access_log=False,
            timeout_graceful_shutdown=int(settings.drain_timeout_s) or None,
            loop=event_loop(),  # as the single process
            timeout_keep_alive=settings.keep_alive_timeout_s,  # above the clients' pool expiry (the setting says why)
            server_header=False,
            timeout_worker_healthcheck=WORKER_HEALTHCHECK_S,
        )
        sock = config.bind_socket()
        print(
            f"stopgate: gateway on http://{settings.host}:{settings.port} -> {settings.upstream_url} "
            f"({settings.workers} workers, parent pid {os.getpid()})",
            file=sys.stderr,
        )
        try:
            Supervisor(config, [sock], metrics_dir).run()
        finally:
            sock.close()
        return 0
    finally:
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous
        shutil.rmtree(metrics_dir, ignore_errors=True)
