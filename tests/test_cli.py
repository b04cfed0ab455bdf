"""``stopgate serve``: clear start-up errors, and a clean stop with no orphan engine."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from gateway.engine.embedded import EmbeddedEngine, free_port
from gateway.settings import EngineSettings
from loadtest.fake_engine import FakeEngine
from tests.support.cli import STOPGATE, assert_clean_failure, run_cli


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = run_cli("serve", "--upstream", "http://127.0.0.1:9", "--port", str(port))
    assert_clean_failure(proc, f"port {port} on 127.0.0.1 is already in use")


def test_missing_model_path_is_a_clear_error(tmp_path: Path) -> None:
    proc = run_cli("serve", "--model-path", str(tmp_path / "nope"), "--port", str(free_port()))
    assert_clean_failure(proc, "has no config.json")


def test_bad_routes_file_names_the_bad_key(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text("routes:\n  arith:\n    upstream_model: m\n    default_max_tokens: -3\n")
    proc = run_cli("serve", "--upstream", "http://127.0.0.1:9", "--routes", str(routes))
    assert_clean_failure(proc, "default_max_tokens")


def test_bad_environment_setting_names_the_variable() -> None:
    proc = run_cli("serve", env={"STOPGATE_READ_TIMEOUT_S": "-1"})
    assert_clean_failure(proc, "STOPGATE_READ_TIMEOUT_S")


def test_bad_upstream_url_is_refused() -> None:
    proc = run_cli("serve", "--upstream", "localhost:8000")
    assert_clean_failure(proc, "http://")


def test_several_workers_without_a_shared_state_are_refused() -> None:
    """Issue 17: workers share one controller through the state file; a state kept in memory cannot be shared."""
    proc = run_cli("serve", "--upstream", "http://127.0.0.1:9", "--workers", "2", env={"STOPGATE_STATE_PATH": "none"})
    assert_clean_failure(proc, "STOPGATE_STATE_PATH to a file or STOPGATE_STATE_URL")


def test_a_bad_worker_count_names_the_variable() -> None:
    proc = run_cli("serve", "--upstream", "http://127.0.0.1:9", "--workers", "many")
    assert_clean_failure(proc, "STOPGATE_WORKERS")


def _engine_failure_model(tmp_path: Path) -> Path:
    model = tmp_path / "broken"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "no_such_architecture"}')
    return model


def test_engine_that_fails_to_start_is_a_clear_error(tmp_path: Path) -> None:
    log = tmp_path / "engine.log"
    proc = run_cli(
        "serve", "--model-path", str(_engine_failure_model(tmp_path)), "--engine-log", str(log),
        "--port", str(free_port()),
    )  # fmt: skip
    assert_clean_failure(proc, "the embedded engine did not start")
    assert log.exists()


def test_engine_is_warmed_up_with_one_tiny_logprobs_request(fake_engine: tuple[FakeEngine, str]) -> None:
    engine, url = fake_engine
    said: list[str] = []
    EmbeddedEngine(EngineSettings(), port=int(url.rsplit(":", 1)[1]))._warm_up(said.append)
    [body] = engine.stats.requests
    assert body["logprobs"] == 5 and body["max_tokens"] == 2 and body["model"] == "tinyreason"
    assert said[0] == "warming up the engine" and said[1].startswith("warm-up request took ")


def _descendants(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,pgid="], capture_output=True, text=True).stdout
    rows = [tuple(int(x) for x in line.split()) for line in out.splitlines() if line.strip()]
    found = {pid}
    changed = True
    while changed:
        changed = False
        for p, pp, _ in rows:
            if pp in found and p not in found:
                found.add(p)
                changed = True
    return found - {pid}


@pytest.mark.engine
def test_serve_runs_the_embedded_engine_and_sigterm_leaves_no_orphan(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*STOPGATE, "serve", "--port", str(port), "--engine-log", str(tmp_path / "engine.log")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "gateway not ready in time"
            time.sleep(1)
        children = _descendants(proc.pid)
        assert children, "the engine should be a child process"
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"model": "tinyreason", "prompt": "Q: 2+3=?\n", "temperature": 0},
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["choices"][0]["text"].endswith("#### 5")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        time.sleep(1)
        alive = {p for p in children if _alive(p)}
        assert not alive, f"orphaned engine processes: {alive}"
        output = proc.stdout.read() if proc.stdout else ""
        assert "waiting for the engine" in output or "engine ready" in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")
