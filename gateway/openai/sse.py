"""Server-sent events: parse the upstream's byte stream, and encode our own.

The parser follows the SSE spec closely enough for OpenAI-compatible engines:
events are separated by a blank line; ``data:`` lines of one event are joined
with ``\\n``; comments (``:``) and other fields are ignored; CR, LF and CRLF
all end a line; a final event without its blank line is still delivered.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = "[DONE]"


class SSEDecoder:
    """Incremental decoder: feed text pieces, get complete ``data`` payloads."""

    def __init__(self) -> None:
        self._buffer = ""
        self._data: list[str] = []

    def feed(self, text: str) -> list[str]:
        self._buffer += text
        out: list[str] = []
        while True:
            idx = _line_end(self._buffer)
            if idx is None:
                return out
            line, self._buffer = self._buffer[: idx[0]], self._buffer[idx[1] :]
            event = self._line(line)
            if event is not None:
                out.append(event)

    def flush(self) -> list[str]:
        """End of stream: deliver a trailing event that lacked its blank line."""
        out: list[str] = []
        if self._buffer:
            event = self._line(self._buffer)
            self._buffer = ""
            if event is not None:
                out.append(event)
        if self._data:
            out.append("\n".join(self._data))
            self._data = []
        return out

    def _line(self, line: str) -> str | None:
        if line == "":
            if not self._data:
                return None
            event = "\n".join(self._data)
            self._data = []
            return event
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None


def _line_end(buf: str) -> tuple[int, int] | None:
    """Index of the first line terminator and where the next line starts."""
    cr = buf.find("\r")
    lf = buf.find("\n")
    if cr == -1 and lf == -1:
        return None
    if cr != -1 and (lf == -1 or cr < lf):
        if cr + 1 == len(buf):
            return None  # could be the first half of CRLF; wait for more
        return (cr, cr + 2) if buf[cr + 1] == "\n" else (cr, cr + 1)
    return (lf, lf + 1)


async def iter_sse_data(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    decoder = SSEDecoder()
    async for text in chunks:
        for event in decoder.feed(text):
            yield event
    for event in decoder.flush():
        yield event


def encode(payload: dict[str, Any] | str) -> bytes:
    """One SSE event: ``data: <json>`` and a blank line."""
    body = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {body}\n\n".encode()


DONE_EVENT = encode(DONE)


class EventStreamResponse(StreamingResponse):
    """A ``text/event-stream`` body that is cancelled the moment the client leaves, whatever ASGI version.

    Starlette listens for ``http.disconnect`` only under ASGI spec < 2.4; from 2.4 on it waits for ``send`` to
    raise. uvicorn's ``send`` returns quietly once the client has gone, so under 2.4 an abandoned stream would
    be drained to its end and the engine would generate every token for nobody. Cancelling the body is what
    closes the upstream response, which is how vLLM learns to abort.
    """

    def __init__(self, content: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> None:
        super().__init__(
            content, media_type="text/event-stream", headers={**(headers or {}), "cache-control": "no-cache"}
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tg:

            async def stream() -> None:
                try:
                    await self.stream_response(send)
                except OSError:
                    pass  # the client went away mid-write; the watcher below sees the disconnect too
                tg.cancel_scope.cancel()

            tg.start_soon(stream)
            await self.listen_for_disconnect(receive)
            tg.cancel_scope.cancel()
