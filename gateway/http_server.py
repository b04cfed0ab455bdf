"""uvicorn's httptools protocol, writing a response's head together with its first body bytes.

uvicorn writes the status line and headers as soon as the app sends
``http.response.start``, and the body with the next message: two ``send``
calls, and two wake-ups of the client, for every JSON answer. On the 2-core
benchmark machine each extra wake-up of a peer is a context switch on the
critical path (``loadtest/overhead.py``). Here a head waits for whatever the
same event-loop turn writes next; if nothing follows in that turn (a stream
whose first event is not ready yet), it goes out on its own one turn later.
Nothing else changes: every byte is written in order, at most one loop turn
late, and closing the connection writes what is held first.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_HEAD = b"HTTP/1.1 "


class _HeadWithBody:
    """The transport as uvicorn's protocol sees it: a held head is joined to the next write."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + data)
        elif data.startswith(_HEAD):
            self._held = data
            self._loop.call_soon(self._flush)
        else:
            self._transport.write(data)

    def _flush(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:  # everything else is the real transport's
        return getattr(self._transport, name)


class HttpProtocol(HttpToolsProtocol):
    """``uvicorn.Config(http=HttpProtocol)``: httptools, one write per JSON answer."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        wrapped: Any = _HeadWithBody(transport, self.loop)  # type: ignore[arg-type]
        super().connection_made(wrapped)
