"""uvicorn's httptools protocol, writing what one event-loop turn sends in one write.

uvicorn writes the status line and headers as soon as the app sends
``http.response.start``, and each body message as it comes: two ``send``
calls for every JSON answer, and one per SSE event for a stream, even when
the engine's chunks arrived together and were relayed in one loop turn. On
the 2-core benchmark machine each write to loopback costs tens of
microseconds of kernel time plus a wake-up of the peer (``loadtest/overhead.py``).
Here the writes of one loop turn are held and go out together, one turn
later. Nothing else changes: every byte is written in order, at most one loop
turn late, and closing the connection writes what is held first.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

try:  # httptools is uvicorn's optional fast parser ("uvicorn[standard]"); h11 is always there
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _Protocol
except ImportError:  # pragma: no cover - only without httptools
    _Protocol = H11Protocol  # type: ignore[assignment,misc]


class _Coalescing:
    """The transport as uvicorn's protocol sees it: writes of one loop turn become one write."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is None:
            self._held = [data]
            self._loop.call_soon(self._flush)
        else:
            held.append(data)

    def _flush(self) -> None:
        held, self._held = self._held, None
        if held and not self._transport.is_closing():
            self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:  # everything else is the real transport's
        return getattr(self._transport, name)


class HttpProtocol(_Protocol):
    """``uvicorn.Config(http=HttpProtocol)``: httptools (h11 where it is missing), one write per loop turn."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        wrapped: Any = _Coalescing(transport, self.loop)  # type: ignore[arg-type]
        super().connection_made(wrapped)
