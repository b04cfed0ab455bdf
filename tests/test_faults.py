"""Faults at scale against `stopgate serve` as shipped: a thousand streams, clients leaving en masse, SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.engine.embedded import free_port
from loadtest.fake_engine import FakeEngine, Script
from tests.support.control import ADMIN, KEY, routes_file
from tests.support.waiting import wait_until

# Under each HTTP stack the engine client can use (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("engine_transport")

ANSWER = ["<think>", "\n", "1", "+", "2", "=", "3", "\n", "</think>", "\n#### 3"]


# `stopgate serve` with uvloop hidden: it runs on the stdlib loop, as where uvloop is not installed.
WITHOUT_UVLOOP = "import sys; sys.modules['uvloop'] = None; from gateway.cli import main; sys.exit(main())"


@contextmanager
def serve(
    upstream: str, log: Path | None = None, *, loop: str = "uvloop", **env: str
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``stopgate serve`` as a child; its log goes to a file (a pipe nobody reads would fill and block it).

    ``loop`` "asyncio" hides uvloop from it, so it runs on the stdlib loop.
    """
    port = free_port()
    log = log or Path(os.devnull)
    entry = ["-m", "gateway.cli"] if loop == "uvloop" else ["-c", WITHOUT_UVLOOP]
    with open(log, "a") as out:
        proc = subprocess.Popen(
            [sys.executable, *entry, "serve", "--upstream", upstream, "--port", str(port)],
            stdout=out,
            stderr=out,
            text=True,
            env={**os.environ, "STOPGATE_LOG_LEVEL": "warning", **env},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _up(url) or proc.poll() is not None, timeout=30) and proc.poll() is None
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def streams(url: str, n: int) -> list[bytes]:
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one() -> bytes:
            body = {"model": "tinyreason", "prompt": "Q: 1+2=?\n", "stream": True}
            async with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200, await r.aread()
                return await r.aread()

        return await asyncio.gather(*(one() for _ in range(n)))


def settled_fds(pid: int, url: str, transport: str, idle: int) -> int:
    """The gateway's descriptors once its idle engine connections have been let go.

    aiohttp closes each one 4 to 8 s after it went idle. httpx expires them lazily, on the next request:
    after its 4 s expiry one more request lets it close them. Either way the count must come back to that
    of a gateway that has served nothing (how many connections a burst needed depends on the machine's load).
    """
    if transport == "httpx":
        time.sleep(5.0)
        body = {"model": "tinyreason", "prompt": "Q: 1+2=?\n"}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
    assert wait_until(lambda: open_fds(pid) <= idle + 10, timeout=20), (idle, open_fds(pid))
    return open_fds(pid)


def test_a_thousand_concurrent_streams_all_finish_and_leak_no_descriptors(
    fake_engine: tuple[FakeEngine, str], engine_transport: str
) -> None:
    engine, upstream = fake_engine
    engine.default = Script(pieces=ANSWER, delay_s=0.05)  # half a second each: the thousand overlap
    # A burst opens up to a thousand engine connections at once, and a connect's timeout includes the wait for
    # the gateway's event loop, busy taking the same thousand requests: under httpx's own transport (a few ms of
    # CPU per new connection) on two cores, that wait passed the default 5 s in CI (ConnectTimeout, 503). This
    # test is about every stream finishing and no descriptor leaking, so the connect timeout is generous.
    with serve(upstream, STOPGATE_CONNECT_TIMEOUT_S="60") as (proc, url):
        idle = open_fds(proc.pid)
        first = asyncio.run(streams(url, 1000))
        after_first = settled_fds(proc.pid, url, engine_transport, idle)
        second = asyncio.run(streams(url, 1000))
        after_second = settled_fds(proc.pid, url, engine_transport, idle)
    for body in first + second:
        assert body.endswith(b"data: [DONE]\n\n") and b"#### 3" in body
    nudges = 2 if engine_transport == "httpx" else 0  # the requests that let httpx expire its idle connections
    assert engine.stats.completed == 2000 + nudges and engine.stats.active == 0
    # Idle engine connections are let go after each burst; a second burst must not leave more behind.
    assert after_second <= after_first + 10, (after_first, after_second)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_clients_leaving_en_masse_abort_every_upstream_request(fake_engine: tuple[FakeEngine, str], loop: str) -> None:
    """Issue 17: under uvloop too, every departure is noticed and its engine request aborted."""
    engine, upstream = fake_engine
    engine.default = Script(pieces=["<think>"] + ["x"] * 2000, delay_s=0.01)  # 20 s if nobody leaves

    async def leave(url: str, n: int) -> None:
        limits = httpx.Limits(max_connections=n + 10)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

            async def one() -> None:
                body = {"model": "tinyreason", "prompt": "Q: 1+2=?\n", "stream": True}
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    async for _ in r.aiter_bytes():
                        break  # the first bytes, then the client leaves

            await asyncio.gather(*(one() for _ in range(n)))

    with serve(upstream, loop=loop) as (proc, url):
        asyncio.run(leave(url, 200))
        assert wait_until(lambda: engine.stats.cancelled == 200 and engine.stats.active == 0, timeout=20), (
            engine.stats.cancelled,
            engine.stats.active,
        )
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        assert _metric(url, "stopgate_in_flight_requests") == 0.0


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def test_state_survives_sigkill_and_a_restart(fake_engine: tuple[FakeEngine, str], tmp_path: Path) -> None:
    engine, upstream = fake_engine
    engine.default = Script(pieces=ANSWER)
    env: dict[str, Any] = {
        "STOPGATE_ROUTES_FILE": str(routes_file(tmp_path)),
        "STOPGATE_STATE_PATH": str(tmp_path / "state.db"),
        "STOPGATE_ADMIN_KEY": KEY,
    }
    with serve(upstream, **env) as (proc, url):
        for _ in range(40):
            body = {"model": "arith", "prompt": "Q: 1+2=?\n", "reference_id": "a1"}
            assert httpx.post(f"{url}/v1/completions", json=body, timeout=10).status_code == 200
        text = '{"id": "b1", "prompt": "Q: 7+7=?", "answers": ["14"], "route": "arith"}\n'
        assert httpx.put(f"{url}/admin/routes/arith/references/up", content=text, headers=ADMIN).status_code == 200
        before = httpx.get(f"{url}/admin/routes/arith", headers=ADMIN, timeout=10).json()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert before["budget"] < 400 and before["samples"]["gold"] == 40
    with serve(upstream, **env) as (_, url):
        after = httpx.get(f"{url}/admin/routes/arith", headers=ADMIN, timeout=10).json()
    assert after["budget"] == before["budget"] and after["samples"] == before["samples"]
    assert after["controller"]["state"] == before["controller"]["state"]
    assert after["references"] == before["references"]
