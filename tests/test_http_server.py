"""The gateway's uvicorn server: the writes of one loop turn go out as one, in order, never lost; idle
keep-alive connections outlive the clients' pool expiry (issue 15)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import httpx

from gateway.engine.embedded import free_port
from gateway.http.guard import CONNECTION_LOST, ConnectionLimits, _Coalescing
from gateway.http.server import serve_in_thread, server_config
from gateway.settings import Settings

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


class Recorder:
    """A transport that records each write (a fake, not a mock)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return f"extra:{name}"


def test_a_head_and_the_body_written_in_one_loop_turn_go_out_in_one_write() -> None:
    async def main() -> list[bytes]:
        real = Recorder()
        transport = _Coalescing(real, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(HEAD)
        transport.write(b"ok")
        await asyncio.sleep(0)
        return real.writes

    assert asyncio.run(main()) == [HEAD + b"ok"]


def test_a_head_alone_goes_out_one_loop_turn_later() -> None:
    async def main() -> tuple[list[bytes], list[bytes]]:
        real = Recorder()
        transport = _Coalescing(real, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(HEAD)
        before = list(real.writes)
        await asyncio.sleep(0)
        return before, real.writes

    before, after = asyncio.run(main())
    assert before == [] and after == [HEAD]


def test_a_head_and_what_follows_it_in_its_turn_go_out_in_one_write_and_later_writes_go_straight_out() -> None:
    async def main() -> list[list[bytes]]:
        real = Recorder()
        transport = _Coalescing(real, asyncio.get_running_loop())  # type: ignore[arg-type]
        seen = []
        for piece in (HEAD, b"a", b"b"):
            transport.write(piece)
        seen.append(list(real.writes))
        await asyncio.sleep(0)
        seen.append(list(real.writes))
        transport.write(b"c")  # an SSE burst: nothing is held, so it is not deferred to the end of the turn
        transport.write(b"d")
        seen.append(list(real.writes))
        return seen

    held, flushed, direct = asyncio.run(main())
    assert held == [] and flushed == [HEAD + b"ab"] and direct == [HEAD + b"ab", b"c", b"d"]


def test_closing_writes_what_is_held_first_and_other_calls_reach_the_real_transport() -> None:
    async def main() -> Recorder:
        real = Recorder()
        transport = _Coalescing(real, asyncio.get_running_loop())  # type: ignore[arg-type]
        assert transport.get_extra_info("peername") == "extra:peername"
        transport.write(HEAD)
        transport.write(b"body bytes")
        transport.close()
        await asyncio.sleep(0)  # the scheduled flush finds nothing held: no second copy
        return real

    real = asyncio.run(main())
    assert real.writes == [HEAD + b"body bytes"] and real.closed


def test_nothing_is_written_to_a_transport_that_is_already_closing() -> None:
    async def main() -> Recorder:
        real = Recorder()
        transport = _Coalescing(real, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(HEAD)
        real.closed = True  # the peer went away
        await asyncio.sleep(0)
        transport.write(b"late")
        return real

    assert asyncio.run(main()).writes == []


async def _lifespan(receive: Any, send: Any) -> None:
    """Complete startup and shutdown, for the bare ASGI apps these tests serve."""
    while True:
        message = await receive()
        await send({"type": message["type"] + ".complete"})
        if message["type"] == "lifespan.shutdown":
            return


def test_served_responses_are_whole_json_and_streams_under_the_protocol() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["path"] == "/json":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for piece in (b"a", b"b", b"c"):
            await asyncio.sleep(0.01)
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    with serve_in_thread(app) as url, httpx.Client() as client:
        for _ in range(3):  # on one keep-alive connection
            assert client.get(f"{url}/json").content == b"ok"
            assert client.get(f"{url}/stream").content == b"abc"


def test_each_request_carries_its_connections_lost_future_and_it_completes_when_the_client_leaves() -> None:
    """The completion endpoints cancel work on this future's callback instead of a watcher task per request."""
    seen: list[Any] = []
    done = threading.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        lost = scope["extensions"][CONNECTION_LOST]
        seen.append(lost)
        if scope["path"] == "/quick":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        await lost  # the client leaves without an answer
        done.set()

    with serve_in_thread(app) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /quick HTTP/1.1\r\nhost: x\r\n\r\n")
            assert sock.recv(65536).endswith(b"ok")
            sock.sendall(b"GET /wait HTTP/1.1\r\nhost: x\r\n\r\n")
            assert _wait_for(lambda: len(seen) == 2)
            assert not seen[1].done()  # connected: nothing to cancel
        assert done.wait(5)  # closed: the future completed
    assert seen[0] is seen[1]  # one future per connection, for every request on it


def _wait_for(condition: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return bool(condition())


# -- keep-alive: the server must not close an idle connection a client may still reuse ---------------------

HTTPX_POOL_EXPIRY_S = 5.0  # httpx's default keepalive_expiry; uvicorn's default keep-alive timeout is the same


def test_the_serve_config_keeps_idle_connections_longer_than_client_pools() -> None:
    config = server_config(object(), Settings(upstream_url="http://127.0.0.1:9"))
    assert config.timeout_keep_alive == 75
    assert config.timeout_keep_alive > 15  # aiohttp's pool expiry, the longest of the usual clients'
    custom = Settings(upstream_url="http://127.0.0.1:9", keep_alive_timeout_s=20)
    assert server_config(object(), custom).timeout_keep_alive == 20


def _get_health(sock: socket.socket) -> bytes:
    """One ``GET /health`` on ``sock``; the whole response (it has a content-length), or what came before EOF."""
    sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            return data
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        piece = sock.recv(65536)
        if not piece:
            break
        body += piece
    return head + b"\r\n\r\n" + body


def test_stopgate_serve_keeps_an_idle_connection_past_the_httpx_pool_expiry(fake_engine: Any, tmp_path: Any) -> None:
    """A connection idle a little longer than a client pool's expiry is still served (uvicorn's 5 s closed it)."""
    _, upstream = fake_engine
    port = free_port()
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--upstream", upstream, "--port", str(port)],
            stdout=log,
            stderr=log,
            env={**os.environ, "STOPGATE_LOG_LEVEL": "warning"},
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()
                time.sleep(0.1)
        with sock:
            assert _get_health(sock).startswith(b"HTTP/1.1 200")
            time.sleep(HTTPX_POOL_EXPIRY_S + 1)
            again = _get_health(sock)  # the same connection, reused as a client's pool would reuse it
        assert again.startswith(b"HTTP/1.1 200"), again
    finally:
        proc.terminate()
        proc.wait(20)


# -- answered before the body arrived: the client must still read the answer ---------------------------------


def _answer_before_the_body(url: str, *, body_bytes: int = 1024 * 1024) -> bytes:
    """POST announcing ``body_bytes``, sent right after the head as httpx sends it; return all read up to EOF.

    A server that answers from the head alone (a redirect, 401, 413, 429) has the body still arriving when it
    answers. Closing a socket with unread bytes, or one that is still sent some, answers with a reset, and the
    reset makes the client's kernel drop the answer it had not read yet: ``Connection reset by peer`` instead
    of the response (a CI run: ``POST /v1/completions/``, whose redirect FastAPI sends from the head).
    """
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /early HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % body_bytes)
        try:
            sock.sendall(b"x" * body_bytes)
        except OSError:
            pass  # the server stopped reading: what it answered is read below
        time.sleep(0.05)
        data = b""
        try:
            while piece := sock.recv(65536):
                data += piece
        except ConnectionResetError:
            return data + b"<reset>"
        return data


async def _early_app(scope: Any, receive: Any, send: Any) -> None:
    """Answers ``401`` from the head, never reading the body."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    await send({"type": "http.response.start", "status": 401, "headers": [(b"content-length", b"4")]})
    await send({"type": "http.response.body", "body": b"nope"})


def test_an_answer_sent_before_the_body_arrived_is_read_whole_and_closes_the_connection() -> None:
    with serve_in_thread(_early_app) as url:
        answers = [_answer_before_the_body(url) for _ in range(10)]  # a reset lost 19 answers in 20 before
    for data in answers:
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401") and body == b"nope", data
        assert b"connection: close" in head.lower()  # the client knows not to send another request on it


def test_a_client_that_keeps_sending_after_the_answer_is_cut_off_after_the_linger_time() -> None:
    """The lingering close is bounded: a body that never ends holds the connection ``linger_s``, not forever."""
    linger_s = ConnectionLimits().linger_s
    with serve_in_thread(_early_app) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /early HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000000\r\n\r\n")
            started = time.monotonic()
            answer = b""
            with contextlib.suppress(OSError):  # cut off: a reset while sending
                while time.monotonic() - started < linger_s + 8:
                    sock.sendall(b"x" * 4096)
                    readable, _, _ = select.select([sock], [], [], 0.02)
                    if readable:
                        piece = sock.recv(65536)
                        if not piece:
                            break  # EOF: we ended our side; the client may still send until linger_s
                        answer += piece
                while True:  # after the FIN, sending goes on until the server closes at linger_s
                    sock.sendall(b"x" * 4096)
                    time.sleep(0.02)
                    if time.monotonic() - started > linger_s + 8:
                        break
            held = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 401") and answer.endswith(b"nope"), answer
    assert held < linger_s + 8, held
