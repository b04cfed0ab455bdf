"""Start the pieces of a scaled-out gateway as child processes: the fake engine, ``stopgate serve``
replicas sharing one Redis, and HAProxy in front of them. Used by tests/test_fleet.py and loadtest/scale.py."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from gateway.engine.embedded import free_port

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Child:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _spawn(name: str, args: list[str], log: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    with log.open("wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=REPO)


def wait_http(child: Child, path: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}:\n{child.tail()}")
        try:
            if httpx.get(child.url + path, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{child.name} not ready at {child.url}{path} after {timeout_s:.0f} s:\n{child.tail()}")
        time.sleep(0.1)


def fake_engine(logs: Path, *, tokens: int = 30, delay_s: float = 0.0) -> Child:
    port = free_port()
    args = [sys.executable, "-m", "loadtest.fake_engine", "--port", str(port), "--think", "--tokens", str(tokens)]
    args += ["--delay", str(delay_s)]
    log = logs / "fake-engine.log"
    child = Child("fake engine", f"http://127.0.0.1:{port}", _spawn("fake engine", args, log), log)
    wait_http(child, "/v1/models")
    return child


def replica(
    name: str, logs: Path, *, upstream: str, routes: Path, state_url: str, env: Mapping[str, str] | None = None
) -> Child:
    """``stopgate serve`` on a free port, sharing ``state_url``; not waited for (start several, then wait)."""
    port = free_port()
    args = [sys.executable, "-m", "gateway.cli", "serve", "--upstream", upstream, "--port", str(port)]
    args += ["--routes", str(routes), "--auth", "off"]
    log = logs / f"{name}.log"
    full_env = {"STOPGATE_STATE_URL": state_url, "STOPGATE_LOG_LEVEL": "warning", **(env or {})}
    return Child(name, f"http://127.0.0.1:{port}", _spawn(name, args, log, full_env), log)


def haproxy(logs: Path, backends: list[str]) -> Child:
    """HAProxy (Debian's package) on a free loopback port, round robin over ``backends``, health-checked on /ready."""
    binary = shutil.which("haproxy")
    if binary is None:
        raise RuntimeError("haproxy is not installed: `apt-get install haproxy`")
    port = free_port()
    servers = "\n".join(
        f"    server r{i} {url.removeprefix('http://')} check inter 1s" for i, url in enumerate(backends)
    )
    config = logs / "haproxy.cfg"
    config.write_text(
        f"""global
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    option http-keep-alive
    retries 1
    retry-on conn-failure empty-response
frontend gateway
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /ready
{servers}
"""
    )
    log = logs / "haproxy.log"
    child = Child(
        "haproxy", f"http://127.0.0.1:{port}", _spawn("haproxy", [binary, "-db", "-f", str(config)], log), log
    )
    wait_http(child, "/health", timeout_s=30)
    return child
