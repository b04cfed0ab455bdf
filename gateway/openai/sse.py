"""Server-sent events: parse the upstream's byte stream, and encode our own.

The parser follows the SSE spec closely enough for OpenAI-compatible engines:
events are separated by a blank line; ``data:`` lines of one event are joined
with ``\\n``; comments (``:``) and other fields are ignored; CR, LF and CRLF
all end a line; a final event without its blank line is still delivered.

It works on bytes and splits on ``b"\\n\\n"`` in C: an engine sends one
``data: {...}`` line per event, and that common case costs one split and one
slice per event, with no per-line buffer copies.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = b"[DONE]"


class SSEDecoder:
    """Incremental decoder: feed byte pieces, get complete ``data`` payloads (bytes)."""

    def __init__(self) -> None:
        self._buffer = b""
        self._cr = False  # the last piece ended in CR: it may be the first half of CRLF

    def feed(self, data: bytes) -> list[bytes]:
        if (
            not self._buffer
            and not self._cr
            and data.startswith(b"data: ")
            and data.find(b"\n") == len(data) - 2
            and data.endswith(b"\n\n")
            and b"\r" not in data
        ):
            return [data[6:-2]]  # the usual piece: exactly one event of one data line
        if self._cr:
            data = b"\r" + data
            self._cr = False
        if b"\r" in data:  # rare: make every line end a plain LF
            if data.endswith(b"\r"):
                data = data[:-1]
                self._cr = True
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buf = self._buffer + data if self._buffer else data
        if b"\n\n" not in buf:
            self._buffer = buf
            return []
        *blocks, self._buffer = buf.split(b"\n\n")
        out: list[bytes] = []
        for block in blocks:
            if block.startswith(b"data: ") and b"\n" not in block:
                out.append(block[6:])  # the common case: one data line
            else:
                event = _event_data(block)
                if event is not None:
                    out.append(event)
        return out

    def flush(self) -> list[bytes]:
        """End of stream: deliver a trailing event that lacked its blank line."""
        block, self._buffer, self._cr = self._buffer, b"", False
        event = _event_data(block) if block else None
        return [event] if event is not None else []


def _event_data(block: bytes) -> bytes | None:
    """The data of one event (its lines, without the blank line that ended it); None if it has none."""
    data: list[bytes] = []
    for line in block.split(b"\n"):
        if not line or line.startswith(b":"):
            continue
        field, _, value = line.partition(b":")
        if field == b"data":
            data.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(data) if data else None


def _unserialisable(obj: Any) -> Any:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _make_json_encoder() -> Callable[[Any], str]:
    """Compact JSON (``ensure_ascii``), as ``json.dumps(..., separators=(",", ":"))`` writes it.

    ``JSONEncoder.encode`` builds a C encoder on every call; this builds it once.
    No circular-reference check: chunks are trees of plain values.
    """
    if c_make_encoder is None:  # no C accelerator (not CPython)
        return json.JSONEncoder(separators=(",", ":")).encode
    iterencode = c_make_encoder(None, _unserialisable, encode_basestring_ascii, None, ":", ",", False, False, True)

    def encode_json(obj: Any) -> str:
        return "".join(iterencode(obj, 0))

    return encode_json


_encode_json = _make_json_encoder()
_decoder = json.JSONDecoder()


def encode(payload: dict[str, Any] | str) -> bytes:
    """One SSE event: ``data: <json>`` and a blank line."""
    body = payload if isinstance(payload, str) else _encode_json(payload)
    return b"data: " + body.encode() + b"\n\n"


def loads(data: bytes) -> Any:
    """``json.loads`` for one event's payload, minus its per-call overhead for bytes.

    ``json.loads(bytes)`` sniffs the encoding and runs two regex matches for
    whitespace; engine payloads are UTF-8 JSON with no surrounding whitespace,
    so the C scanner is called directly, and anything else takes the slow path.
    Raises ``ValueError`` (``UnicodeDecodeError`` or ``JSONDecodeError``) on bad input.
    """
    text = data.decode()
    try:
        value, end = _decoder.raw_decode(text)
    except json.JSONDecodeError:
        return json.loads(text)  # leading whitespace, or really malformed: let json say which
    if end != len(text):
        return json.loads(text)  # trailing whitespace is fine, anything else raises
    return value


DONE_EVENT = encode(DONE.decode())


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
