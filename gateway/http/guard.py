"""Connection-level limits for the HTTP server (issue 14): header size and count, a header timeout, connections.

uvicorn's httptools protocol bounds none of these: httptools buffers a
header of any size (a 64 MB value was answered 200), a connection that
never finishes its headers is kept forever (slowloris), and uvicorn's
``limit_concurrency`` answers 503 only once a request's headers are complete,
so connections that never finish them still take a file descriptor each.
h11's ``h11_max_incomplete_event_size`` bounds the header bytes only, in
pure Python, on the hot path. So the gateway keeps httptools and runs this
subclass of its protocol, which adds:

* ``max_header_bytes``: the request line and headers of one request; past
  it the connection gets ``431`` and is closed. Bytes are counted as they
  arrive, so at most one read (256 KiB) more is ever buffered;
* ``max_headers``: header fields per request, ``431`` past it;
* ``header_timeout_s``: from a connection's first byte (or its opening) to
  the end of the request's headers; past it ``408`` and close;
* ``max_connections``: open connections at once; one more is answered
  ``503`` with ``Retry-After`` and closed at once, so descriptors stay below
  the process's limit (``effective_max_connections``);
* a lingering close (``linger_s``), as nginx's ``lingering_close``: an
  answer sent before the request's body arrived (a redirect, 401, 413, 429)
  or before its head did (408, 431) says ``connection: close``, and the
  connection ends our side (FIN), then reads and drops what the client still
  sends for at most ``linger_s`` before it closes. Closing at once, with the
  body still arriving, answers it with a reset, and a reset makes the client's
  kernel drop the answer it had not read yet (``Connection reset by peer``
  in 19 of 20 tries of ``tests/test_http_server.py``'s case).

It also writes a response's head with what follows it in the same event-loop
turn (``_Coalescing``): uvicorn writes the status line and headers as soon as
the app sends ``http.response.start``, and the body as it comes, so a JSON
answer would cost two writes, and each write to loopback costs tens of
microseconds of kernel time plus a wake-up of the peer (``loadtest/overhead.py``).
A write with no head held goes out at once: an SSE stream already sends a burst
of events per write (gateway/http/endpoints.py), and deferring each of its
writes to the end of the turn cost a scheduled callback per write. Every byte is
still written in order, and closing the connection writes what is held first.

The body's own timeout is the handler's (``body_timeout_s`` in
``gateway/http/endpoints.py``), which can answer in OpenAI's error format.
``rate_limited_exception_handler`` keeps the event loop's own errors (such as
``accept()`` out of descriptors) to one log line per key and interval.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("stopgate.http")

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}
# Descriptors kept back from client connections: engine connections, the store, logs, the listener.
FD_RESERVE = 64


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    header_timeout_s: float = 10.0
    max_connections: int = 1024
    linger_s: float = 2.0


def effective_max_connections(configured: int, *, upstream_connections: int) -> int:
    """``configured`` (0: automatic), but below what the descriptor limit allows beside the engine connections.

    The soft ``RLIMIT_NOFILE`` is first raised to the hard limit, as servers do.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = min(hard, 1 << 20) if hard != resource.RLIM_INFINITY else 1 << 20
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    # Half the descriptors at most go to engine connections, the rest to clients.
    available = soft - FD_RESERVE - min(upstream_connections, soft // 2)
    cap = max(16, available)
    return cap if configured <= 0 else min(configured, cap)


#: The scope extension under which the guarded protocol puts a future that is done once the connection is
#: lost: the completion endpoints watch it with a callback instead of a watcher task per request.
CONNECTION_LOST = "stopgate.connection_lost"


def guarded_protocol(limits: ConnectionLimits) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with ``limits``, one write per loop turn (``uvicorn.Config(http=...)``)."""

    class GuardedHttpToolsProtocol(_Guarded):
        LIMITS = limits

    return GuardedHttpToolsProtocol


class _Guarded(HttpToolsProtocol):
    LIMITS = ConnectionLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # reading a request line and headers (or waiting for the first byte)
        self._head_bytes = 0
        self._header_count = 0
        self._refused = False  # answered and closing: nothing more is read
        self._skipping = False  # the parser is inside a request that will not be served
        self._head_timer: asyncio.TimerHandle | None = None
        self._unread = False  # the client may still be sending this request's head or body
        self._keep_alive = True  # the request's own keep-alive, kept while its body is still to come
        self._draining = False
        self._raw: asyncio.Transport | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._lost: asyncio.Future[None] = self.loop.create_future()

    # -- the connection ----------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._raw = transport
        wrapped: Any = _Coalescing(transport, self.loop, self._close)
        super().connection_made(wrapped)
        if len(self.connections) > self.LIMITS.max_connections:
            self._refuse(503, b"too many connections", extra=b"retry-after: 1\r\n")
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        if not self._lost.done():
            self._lost.set_result(None)
        super().connection_lost(exc)

    def shutdown(self) -> None:
        self._draining = True
        super().shutdown()

    def _close(self) -> None:
        """Close the connection; with a request still arriving, end our side and drop what comes first."""
        raw = self._raw
        assert raw is not None
        if not self._unread or self._linger_timer is not None or raw.is_closing() or not raw.can_write_eof():
            raw.close()
            return
        self._refused = True  # nothing more is parsed: data_received drops it
        raw.write_eof()
        raw.resume_reading()
        self._linger_timer = self.loop.call_later(self.LIMITS.linger_s, raw.close)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._refused:
            return
        if self._skipping:
            self._refuse(431, b"too many header fields")
        elif self._in_head and self._head_bytes > self.LIMITS.max_header_bytes:
            self._refuse(431, b"request headers too large")

    # -- parser callbacks ------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._unread = True
        self._header_count = 0
        if self._head_timer is None:
            self._arm_head_timer()
        super().on_message_begin()
        extensions: Any = {CONNECTION_LOST: self._lost}
        self.scope["extensions"] = extensions

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count <= self.LIMITS.max_headers:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._header_count > self.LIMITS.max_headers:
            self._skipping = True  # answered with 431 once this read has been parsed
            return
        self._in_head = False
        self._head_bytes = 0
        self._disarm_head_timer()
        super().on_headers_complete()
        # Until its body has arrived, an answer ends the connection (on_message_complete gives keep-alive back).
        cycle = self.cycle
        if cycle is not None:
            self._keep_alive, cycle.keep_alive = cycle.keep_alive, False

    def on_body(self, body: bytes) -> None:
        if not self._skipping:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._skipping:
            return
        super().on_message_complete()
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            cycle.keep_alive = self._keep_alive and not self._draining
        self._unread = False
        self._in_head = True  # the next request's head may follow on this connection
        self._head_bytes = 0

    # -- refusing ----------------------------------------------------------

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self.LIMITS.header_timeout_s, self._head_timeout)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self._in_head and not self._refused and not self.transport.is_closing():
            self._refuse(408, b"request headers not received in time")

    def _refuse(self, status: int, message: bytes, *, extra: bytes = b"") -> None:
        self._refused = True
        self._disarm_head_timer()
        if self.transport.is_closing():
            return
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
            b"connection: close\r\n%s\r\n%s" % (status, _REASONS[status], len(message), extra, message)
        )
        self.transport.close()


class _Coalescing:
    """The transport as uvicorn's protocol sees it: a response head and the writes that follow it in its loop
    turn become one write; any other write goes straight through."""

    def __init__(
        self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, close: Callable[[], None] | None = None
    ) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] | None = None
        self._close = close or transport.close
        self._closed = False

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            held.append(data)
        elif data.startswith(b"HTTP/"):  # a status line and headers (uvicorn writes them apart from the body)
            self._held = [data]
            self._loop.call_soon(self._flush)
        elif not self._transport.is_closing():
            self._transport.write(data)

    def _flush(self) -> None:
        held, self._held = self._held, None
        if held and not self._transport.is_closing():
            self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def close(self) -> None:
        self._flush()
        self._closed = True
        self._close()

    def is_closing(self) -> bool:
        return self._closed or self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:  # everything else is the real transport's
        return getattr(self._transport, name)


class rate_limited_exception_handler:  # noqa: N801 (used as a callable, named like a function)
    """An event-loop exception handler that logs each kind of error at most once per ``interval_s``.

    Out of descriptors, ``accept()`` fails on every try; one line per interval
    (with the count of those not logged) says as much as a traceback per try.
    """

    def __init__(self, interval_s: float = 10.0, clock: Any = time.monotonic) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        key = f"{context.get('message', '')}|{type(exc).__name__ if exc else ''}"
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        if len(self._last) > 256:  # keys are few in practice; never let them grow without bound
            self._last = {key: now}
        skipped = self._suppressed.pop(key, 0)
        log.error(
            "event loop: %s%s%s",
            context.get("message", "error"),
            f": {exc!r}" if exc else "",
            f" ({skipped} more like it not logged in the last {self.interval_s:.0f} s)" if skipped else "",
        )
