"""Issue 17: the engine client keeps its guarantees over either HTTP stack under httpx (aiohttp's or httpx's own).

The engine here is a raw asyncio server that misbehaves on purpose (stalls, hangs up, sends garbage), so the
tests see what each transport raises on a real socket and that it reaches the gateway as the same error kind.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import httpx
import pytest
from fastapi.testclient import TestClient
from httpx_aiohttp import AiohttpTransport

from gateway.engine.client import EngineTransport, Upstream, translate
from gateway.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from gateway.http.app import create_app
from gateway.settings import Settings

TRANSPORTS: list[EngineTransport] = ["aiohttp", "httpx"]
HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
DONE = b"data: [DONE]\n\n"

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def chunked(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
    )
    await reader.readexactly(length)


class Engine:
    """Counts connections (accepted, open now, most at once, closed by the client) around a scripted handler."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.accepted = 0
        self.open = 0
        self.most = 0
        self.closed_by_client = 0
        self.connections: list[tuple[asyncio.StreamWriter, asyncio.Task[Any]]] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.append((writer, task))
        self.accepted += 1
        self.open += 1
        self.most = max(self.most, self.open)
        try:
            await self.handler(reader, writer)
            if await reader.read() == b"":  # wait for the client to hang up, however long
                self.closed_by_client += 1
        except (ConnectionError, asyncio.IncompleteReadError):
            self.closed_by_client += 1
        finally:
            self.open -= 1
            writer.close()


@asynccontextmanager
async def engine(handler: Handler) -> AsyncIterator[tuple[Engine, str]]:
    counted = Engine(handler)
    server = await asyncio.start_server(counted, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield counted, f"http://127.0.0.1:{port}"
    finally:
        server.close()
        # Hang up on whoever is still connected, so every handler ends before the loop does.
        for writer, _ in counted.connections:
            writer.transport.abort()
        await asyncio.gather(*(task for _, task in counted.connections), return_exceptions=True)


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


async def read_all(upstream: Upstream) -> list[dict[str, Any]]:
    async with upstream.stream("/v1/completions", {"prompt": "x"}, request_id="r") as chunks:
        return [chunk async for chunk in chunks]


async def stalls_after_headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(HEAD + chunked(event({"n": 1})))
    await reader.read()  # until the client hangs up


async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    await reader.read()


async def hangs_up_mid_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(HEAD + chunked(event({"n": 1})))
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.transport.abort()


async def hangs_up_before_answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.transport.abort()


async def answers_garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(b"SPDY/9 nonsense\r\n\r\n")
    await writer.drain()


async def streams_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(HEAD)
    for n in range(100_000):
        writer.write(chunked(event({"n": n})))
        await writer.drain()
        await asyncio.sleep(0.002)


async def answers_each(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while not reader.at_eof():
        try:
            await read_request(reader)
        except asyncio.IncompleteReadError:
            return  # the client hung up
        writer.write(HEAD + chunked(event({"n": 1}) + DONE) + b"0\r\n\r\n")
        await writer.drain()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    ("handler", "error"),
    [
        (stalls_after_headers, UpstreamTimeout),
        (never_answers, UpstreamTimeout),
        (hangs_up_mid_stream, UpstreamUnavailable),
        (hangs_up_before_answering, UpstreamUnavailable),
        (answers_garbage, UpstreamUnavailable),
    ],
)
def test_a_misbehaving_engine_is_the_same_gateway_error_over_either_transport(
    transport: EngineTransport, handler: Handler, error: type[UpstreamError]
) -> None:
    async def run() -> UpstreamError:
        async with engine(handler) as (_, url):
            upstream = Upstream(url, read_timeout_s=0.3, transport=transport)
            try:
                with pytest.raises(UpstreamError) as caught:
                    await asyncio.wait_for(read_all(upstream), 10)
            finally:
                await upstream.aclose()
        return caught.value

    assert type(asyncio.run(run())) is error


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_refused_connection_is_unreachable_over_either_transport(transport: EngineTransport) -> None:
    async def run() -> None:
        async with engine(never_answers) as (_, url):
            pass  # the port is free again: connecting is refused
        upstream = Upstream(url, transport=transport)
        try:
            with pytest.raises(UpstreamUnavailable, match="unreachable"):
                await read_all(upstream)
            with pytest.raises(UpstreamUnavailable):
                await upstream.get_json("/v1/models")
            with pytest.raises(UpstreamUnavailable):
                await upstream.post_json("/tokenize", {}, request_id="r")
        finally:
            await upstream.aclose()

    asyncio.run(run())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_leaving_the_stream_early_closes_the_engine_connection(transport: EngineTransport) -> None:
    """An early stop or a client that left: the engine sees the connection close, which is what makes vLLM abort."""

    async def run() -> Engine:
        async with engine(streams_forever) as (counted, url):
            upstream = Upstream(url, transport=transport)
            try:
                async with upstream.stream("/v1/completions", {}, request_id="r") as chunks:
                    async for chunk in chunks:
                        if chunk["n"] == 3:
                            break
                await wait_for(lambda: counted.closed_by_client >= 1)
            finally:
                await upstream.aclose()
        return counted

    assert asyncio.run(run()).closed_by_client == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_cancelling_a_stream_closes_the_engine_connection(transport: EngineTransport) -> None:
    async def run() -> Engine:
        async with engine(streams_forever) as (counted, url):
            upstream = Upstream(url, transport=transport)
            try:
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(read_all(upstream), 0.2)
                await wait_for(lambda: counted.closed_by_client >= 1)
            finally:
                await upstream.aclose()
        return counted

    assert asyncio.run(run()).closed_by_client == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_connections_are_bounded_by_max_connections(transport: EngineTransport) -> None:
    async def run() -> Engine:
        async with engine(stalls_after_headers) as (counted, url):
            upstream = Upstream(url, read_timeout_s=0.5, max_connections=2, transport=transport)
            try:
                results = await asyncio.gather(*(read_all(upstream) for _ in range(4)), return_exceptions=True)
            finally:
                await upstream.aclose()
        # The two that waited for a connection past the pool timeout: httpx's PoolTimeout is a 504, aiohttp's
        # (its connect timeout covers the wait) a 503 that the pool may retry on another replica; either way
        # the request never reached the engine.
        assert all(isinstance(r, UpstreamTimeout | UpstreamUnavailable) for r in results), results
        return counted

    assert asyncio.run(run()).most == 2


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_idle_connection_is_reused_but_not_after_four_seconds(transport: EngineTransport) -> None:
    """The engine's uvicorn drops idle connections after 5 s; reusing one it just closed fails a request (a 503)."""

    async def run() -> Engine:
        async with engine(answers_each) as (counted, url):
            upstream = Upstream(url, transport=transport)
            try:
                assert await read_all(upstream) == [{"n": 1}]
                assert await read_all(upstream) == [{"n": 1}]
                assert counted.accepted == 1  # the second went on the first one's connection
                await asyncio.sleep(4.3)
                assert await read_all(upstream) == [{"n": 1}]
            finally:
                await upstream.aclose()
        return counted

    assert asyncio.run(run()).accepted == 2


@pytest.mark.parametrize(
    ("exc", "error"),
    [
        # httpx-aiohttp's table makes every aiohttp ClientConnectionError a ConnectTimeout; the cause decides.
        (aiohttp.SocketTimeoutError("Timeout on reading data from socket"), UpstreamTimeout),
        (aiohttp.ServerTimeoutError("timeout"), UpstreamTimeout),
        (aiohttp.ConnectionTimeoutError("Connection timeout to host"), UpstreamUnavailable),
        (aiohttp.ServerDisconnectedError(), UpstreamUnavailable),
        (aiohttp.ClientPayloadError("Response payload is not completed"), UpstreamUnavailable),
        (aiohttp.ClientConnectionResetError("reset"), UpstreamUnavailable),
    ],
)
def test_an_aiohttp_error_maps_by_itself_not_by_the_httpx_error_wrapping_it(
    exc: Exception, error: type[UpstreamError]
) -> None:
    try:
        raise httpx.ConnectTimeout("as httpx-aiohttp maps it") from exc
    except httpx.HTTPError as wrapped:
        assert type(translate(wrapped)) is error
    assert type(translate(exc)) is error  # and the same when it surfaces unmapped


def test_a_bare_timeout_is_a_timeout_and_an_unknown_httpx_error_a_bad_response() -> None:
    assert type(translate(TimeoutError())) is UpstreamTimeout
    assert type(translate(httpx.TooManyRedirects("loop"))) is UpstreamError
    assert type(translate(httpx.PoolTimeout("busy"))) is UpstreamTimeout  # httpx's own: unchanged


@pytest.mark.parametrize(("name", "kind"), [("aiohttp", AiohttpTransport), ("httpx", httpx.AsyncHTTPTransport)])
def test_the_engine_transport_setting_picks_the_stack_under_the_gateways_client(
    name: str, kind: type[httpx.AsyncBaseTransport], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STOPGATE_ENGINE_TRANSPORT", name)
    app = create_app(Settings(upstream_url="http://127.0.0.1:9"))
    with TestClient(app):
        upstream = app.state.services.upstream.replicas[0].upstream
        assert isinstance(upstream.client._transport, kind)


def test_aiohttp_is_the_default_transport() -> None:
    assert Settings(upstream_url="http://127.0.0.1:9").engine_transport == "aiohttp"
    with pytest.raises(ValueError, match="engine_transport"):
        Settings(upstream_url="http://127.0.0.1:9", engine_transport="curl")
