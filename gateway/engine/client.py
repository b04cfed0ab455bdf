"""The one way to reach engines: OpenAI-compatible HTTP, streams on aiohttp, the rest on httpx.

``Upstream.stream`` owns an upstream response's lifetime: leaving its
``async with`` block closes the connection, and vLLM aborts the request. That
is how both a client disconnect and an early stop free the engine.

By default the bytes travel over aiohttp's HTTP/1.1 stack: the streams, which
carry all the traffic, go through aiohttp's ``ClientSession`` directly, and the
small JSON calls through httpx over that same session
(``httpx_aiohttp.AiohttpTransport``, the transport the OpenAI SDK offers).
``transport="httpx"`` puts everything on httpx's own stack. httpx's request
building and response wrapping cost a fifth of a gateway worker's CPU per
one-token request, which is why the hot path skips them (README, "Engine
client transports"). Errors from either stack are mapped onto the gateway's
exception tree in ``translate``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Literal, Protocol

import aiohttp
import anyio
import httpx
from httpx_aiohttp import AiohttpTransport
from yarl import URL

from gateway.errors import (
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.openai.sse import DONE, SSEDecoder, loads

_MAX_ERROR_BODY = 64 * 1024
# What httpx's ``json=`` sends, built once: ``json.dumps`` with arguments builds an encoder per call.
_encode_body = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
_JSON_TYPE = "application/json"

log = logging.getLogger("stopgate.upstream")

EngineTransport = Literal["aiohttp", "httpx"]

# What a transport call may raise. httpx-aiohttp re-raises most of aiohttp's errors as httpx's, but not all
# (a malformed response is a bare ``ClientResponseError``), so aiohttp's own are caught beside them.
TRANSPORT_ERRORS = (httpx.HTTPError, aiohttp.ClientError, TimeoutError)
# Around a ``yield`` the caller's own code runs: a bare ``TimeoutError`` there is the caller's, not the engine's.
_STREAM_ERRORS = (httpx.HTTPError, aiohttp.ClientError)


def translate(exc: Exception) -> UpstreamError:
    """Map a transport's error (httpx's, or aiohttp's under httpx-aiohttp) onto the gateway's exception tree.

    httpx-aiohttp's table is loose: every ``aiohttp.ClientConnectionError``, a
    read timeout's ``ServerTimeoutError`` included, becomes ``httpx.ConnectTimeout``.
    So an httpx error raised from an aiohttp one is judged by the aiohttp one.
    """
    if isinstance(exc, httpx.HTTPError) and isinstance(exc.__cause__, aiohttp.ClientError | TimeoutError):
        exc = exc.__cause__
    name = type(exc).__name__
    # The engine never took the request: unreachable, not slow. (aiohttp's connect timeout also covers the
    # wait for a free pooled connection, which httpx calls a pool timeout.)
    if isinstance(exc, httpx.ConnectTimeout | aiohttp.ConnectionTimeoutError | aiohttp.ClientConnectorError):
        return UpstreamUnavailable(f"The upstream engine is unreachable ({name}).")
    if isinstance(exc, httpx.TimeoutException | TimeoutError):  # aiohttp's ServerTimeoutError is a TimeoutError
        return UpstreamTimeout(f"The upstream engine did not respond in time ({name}).")
    if isinstance(
        exc,
        httpx.ConnectError
        | httpx.RemoteProtocolError
        | httpx.NetworkError
        # Disconnected, reset, a body cut short, a response aiohttp could not parse: httpx's network
        # and protocol errors.
        | aiohttp.ClientConnectionError
        | aiohttp.ClientPayloadError
        | aiohttp.ClientResponseError,
    ):
        return UpstreamUnavailable(f"The upstream engine is unreachable ({name}).")
    return UpstreamError(f"Talking to the upstream engine failed ({name}).")


def _error_message(status: int, raw: bytes) -> tuple[str, str | None]:
    """The message (and param) of an engine's error body, whatever its shape."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        text = raw.decode("utf-8", "replace").strip()[:500]
        return (text or f"HTTP {status}"), None
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail") or json.dumps(err)[:500]
            param = err.get("param")
            return str(msg), param if isinstance(param, str) else None
        if isinstance(err, str):
            return err, None
    return json.dumps(body)[:500], None


class ChunkSource(Protocol):
    """An engine stream's JSON chunks: read a burst at a time with ``batch()``, or one by one (``AsyncIterator``)."""

    def batch(self) -> Awaitable[list[dict[str, Any]]]: ...

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]: ...


class EngineClient(Protocol):
    """What the generation code needs from an engine: one ``Upstream`` or a pool of replicas."""

    @property
    def base_url(self) -> str: ...

    def stream(
        self, path: str, body: dict[str, Any], *, request_id: str
    ) -> AbstractAsyncContextManager[ChunkSource]: ...

    async def get_json(self, path: str, *, timeout_s: float = 5.0) -> Any: ...

    async def post_json(self, path: str, body: dict[str, Any], *, request_id: str) -> Any: ...

    async def aclose(self) -> None: ...


class Upstream:
    """One engine over HTTP."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 120.0,
        max_connections: int = 512,
        transport: httpx.AsyncBaseTransport | EngineTransport = "aiohttp",
    ) -> None:
        """``transport`` names the HTTP stack (``"aiohttp"`` or ``"httpx"``), or is an httpx transport (a fake)."""
        self.base_url = base_url
        self._max_connections = max_connections
        # The read timeout is per gap between bytes, so it must cover the engine's time to first token under
        # load; httpx's 5 s default won't. Waiting for a free connection is waiting for the engine too: it gets
        # the read timeout. aiohttp's names for the same: sock_connect, sock_read, and connect (the wait for a
        # pooled connection plus connecting). aiohttp has no write timeout, and the request bodies are small.
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=read_timeout_s, sock_connect=connect_timeout_s, sock_read=read_timeout_s
        )
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}
        # Idle connections are dropped before the engine's uvicorn drops them (its keep-alive is 5 s, as is
        # httpx's default): reusing one it has just closed is a ReadError (a 503) on a request that never ran.
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections, keepalive_expiry=4.0
        )
        self._direct = transport == "aiohttp"  # streams on aiohttp's ClientSession, not through httpx
        under: httpx.AsyncBaseTransport | None
        if self._direct:
            under = AiohttpTransport(limits=limits, client=self._aiohttp)  # shares the streams' connection pool
        else:
            under = None if isinstance(transport, str) else transport  # httpx's own, or a test's fake
        self.client = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(connect=connect_timeout_s, read=read_timeout_s, write=10.0, pool=read_timeout_s),
            limits=limits,
            transport=under,
        )

    def _aiohttp(self) -> aiohttp.ClientSession:
        """The aiohttp session, made on first use (it needs the running loop): at most ``max_connections``,
        idle ones closed after 4 s, no cookies (engines set none)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=4.0),
                timeout=self._timeout,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def aclose(self) -> None:
        await self.client.aclose()
        if self._session is not None:
            await self._session.close()

    def stream(
        self, path: str, body: dict[str, Any], *, request_id: str, total_timeout_s: float | None = None
    ) -> AbstractAsyncContextManager[ChunkStream]:
        """POST a streaming request; yield an iterator of its JSON chunks.

        Raises before yielding if the engine refuses the request, so the
        caller can still answer with a proper HTTP status. A stream that runs
        past ``total_timeout_s`` (from now) ends with ``UpstreamTimeout``.
        """
        payload = _encode_body(body).encode()
        deadline = None if total_timeout_s is None else time.monotonic() + total_timeout_s
        if self._direct:
            url = self._urls.get(path)
            if url is None:
                url = self._urls[path] = URL(self.base_url.rstrip("/") + path)
            return _AiohttpStream(self._aiohttp(), url, payload, request_id, deadline, total_timeout_s)
        return self._stream_httpx(path, payload, request_id, deadline, total_timeout_s)

    @asynccontextmanager
    async def _stream_httpx(
        self, path: str, payload: bytes, request_id: str, deadline: float | None, total_timeout_s: float | None
    ) -> AsyncIterator[ChunkStream]:
        headers = {"content-type": _JSON_TYPE, "x-request-id": request_id}
        request = self.client.build_request("POST", path, content=payload, headers=headers)
        try:
            response = await self.client.send(request, stream=True)
        except TRANSPORT_ERRORS as exc:
            raise translate(exc) from exc
        pieces = response.aiter_bytes()
        try:
            if response.status_code >= 400:
                _raise_for_status(response.status_code, await _read_bounded(lambda _n: anext(pieces, b"")))
            yield ChunkStream(lambda: anext(pieces, b""), deadline, total_timeout_s)
        except _STREAM_ERRORS as exc:
            raise translate(exc) from exc
        finally:
            # Closing is what makes the engine abort: it must happen even when
            # the caller is being cancelled (a client that left).
            with anyio.CancelScope(shield=True):
                try:
                    await response.aclose()
                except TRANSPORT_ERRORS as exc:  # the connection is gone already; what ends the block stands
                    log.debug("closing the upstream response of %s failed: %r", request_id, exc)

    async def get_json(self, path: str, *, timeout_s: float = 5.0) -> Any:
        try:
            response = await self.client.get(path, timeout=timeout_s)
        except TRANSPORT_ERRORS as exc:
            raise translate(exc) from exc
        if response.status_code >= 400:
            message, _ = _error_message(response.status_code, response.content[:_MAX_ERROR_BODY])
            raise UpstreamError(f"GET {path} failed (HTTP {response.status_code}): {message}")
        try:
            return response.json()
        except ValueError as exc:
            raise UpstreamError(f"GET {path} returned invalid JSON.") from exc

    async def post_json(self, path: str, body: dict[str, Any], *, request_id: str) -> Any:
        """A small non-streamed JSON request (``/tokenize``): errors map as ``stream``'s do."""
        try:
            response = await self.client.post(path, json=body, headers={"X-Request-Id": request_id})
        except TRANSPORT_ERRORS as exc:
            raise translate(exc) from exc
        if response.status_code >= 400:
            _raise_for_status(response.status_code, response.content[:_MAX_ERROR_BODY])
        try:
            return response.json()
        except ValueError as exc:
            raise UpstreamError(f"POST {path} returned invalid JSON.") from exc


class _AiohttpStream:
    """``Upstream.stream`` on aiohttp's ``ClientSession``. A class rather than an ``asynccontextmanager``: this
    runs for every request, and the decorator's async generator (its creation, the loop's weak set of live
    generators, two steps) cost more than the class's two calls."""

    __slots__ = ("_session", "_url", "_payload", "_request_id", "_deadline", "_total_timeout_s", "_response")

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: URL,
        payload: bytes,
        request_id: str,
        deadline: float | None,
        total_timeout_s: float | None,
    ) -> None:
        self._session, self._url, self._payload, self._request_id = session, url, payload, request_id
        self._deadline, self._total_timeout_s = deadline, total_timeout_s
        self._response: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> ChunkStream:
        headers = {"content-type": _JSON_TYPE, "x-request-id": self._request_id}
        try:
            response = await self._session.post(self._url, data=self._payload, headers=headers)
        except TRANSPORT_ERRORS as exc:
            raise translate(exc) from exc
        self._response = response
        if response.status >= 400:
            try:
                raw = await _read_bounded(response.content.read)
            except _STREAM_ERRORS as exc:
                raise translate(exc) from exc
            finally:
                _let_go(response)
            _raise_for_status(response.status, raw)
        return ChunkStream(response.content.readany, self._deadline, self._total_timeout_s)

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        assert self._response is not None, "entered"
        _let_go(self._response)
        if isinstance(exc, _STREAM_ERRORS):
            raise translate(exc) from exc


def _let_go(response: aiohttp.ClientResponse) -> None:
    """Closing unfinished is what makes the engine abort; a body read to its end keeps its connection.
    Neither awaits, so a cancelled caller (a client that left) closes it too."""
    if response.content.is_eof():
        response.release()
    else:
        response.close()


def _raise_for_status(status: int, raw: bytes) -> None:
    """An engine's error answer as the gateway's error: a 4xx is the request's fault, a 5xx the engine's."""
    message, param = _error_message(status, raw)
    if status < 500:
        raise UpstreamRejected(status, message, param=param)
    raise UpstreamError(f"The upstream engine failed (HTTP {status}): {message}")


async def _read_bounded(read: Callable[[int], Awaitable[bytes]]) -> bytes:
    """An error body, at most ``_MAX_ERROR_BODY`` bytes of it (``read(n)`` returns b"" at its end)."""
    data = b""
    while len(data) < _MAX_ERROR_BODY:
        piece = await read(_MAX_ERROR_BODY - len(data))
        if not piece:
            break
        data += piece
    return data[:_MAX_ERROR_BODY]


# A Responses API stream (``POST /v1/responses``) ends with one of these events instead of ``[DONE]``.
RESPONSE_END_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})


class ChunkStream:
    """The engine's SSE stream as JSON chunks: ``await batch()`` for each burst, or ``async for`` one by one.

    Reads the body's pieces (``read()`` returns whatever has arrived, b"" at the
    end) and decodes the events as bytes (no text decoding of the whole
    stream, no per-line buffers). ``batch()`` returns the chunks of one read:
    a burst the engine sent together (a backlog) comes as one list, so the
    gateway walks it in a plain loop and can send it on in one write. Each
    async generator a chunk passes through cost about 1.2 us per chunk, which
    is why the hot path takes bursts, not chunks.
    """

    def __init__(
        self,
        read: Callable[[], Awaitable[bytes]],
        deadline: float | None = None,
        total_timeout_s: float | None = None,
    ) -> None:
        self._read = read
        self._deadline = deadline
        self._total_timeout_s = total_timeout_s
        self._decoder = SSEDecoder()
        self._done = False  # [DONE] (or a Responses API end event) came: the rest of the body is skipped
        self._ended = False  # the body is read to its end
        self._error: UpstreamError | None = None  # a broken stream, raised once the chunks before it are taken

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[dict[str, Any]]:
        while chunks := await self.batch():
            for chunk in chunks:
                yield chunk

    async def batch(self) -> list[dict[str, Any]]:
        """The chunks of the next read that holds any, in order; ``[]`` once the stream has ended.

        A broken stream raises ``UpstreamError``, after the good chunks read before the break were returned.
        """
        if self._error is not None:
            raise self._error
        try:
            while not self._ended:
                piece = await self._read()
                if self._deadline is not None and time.monotonic() > self._deadline:
                    raise UpstreamTimeout(
                        f"The upstream stream ran past the total timeout of {self._total_timeout_s:g} s."
                    )
                chunks = self._decode(self._decoder.feed(piece) if piece else self._decoder.flush())
                if not piece:
                    self._ended = True
                    if not self._done and self._error is None:
                        self._error = UpstreamError("The upstream stream ended without [DONE].")
                if chunks:
                    return chunks
                if self._error is not None:
                    raise self._error
        except TRANSPORT_ERRORS as exc:
            raise translate(exc) from exc
        return []

    def _decode(self, events: list[bytes]) -> list[dict[str, Any]]:
        """The chunks of ``events`` up to [DONE] (or a malformed one: ``_error``, raised by the next ``batch``)."""
        chunks = []
        for data in events:
            if self._done or self._error is not None:
                # Read on to the end of the body: a response closed unfinished
                # loses its keep-alive connection, and the next request reconnects.
                break
            if data == DONE:
                self._done = True
                break
            try:
                chunk = loads(data)
            except ValueError:
                self._error = UpstreamError("The upstream engine sent a malformed stream chunk.")
                break
            if not isinstance(chunk, dict):
                self._error = UpstreamError("The upstream engine sent a malformed stream chunk.")
            elif "error" in chunk:
                message, _ = _error_message(500, data)
                self._error = UpstreamError(f"The upstream engine failed mid-stream: {message}")
            else:
                chunks.append(chunk)
                self._done = chunk.get("type") in RESPONSE_END_EVENTS
        return chunks
