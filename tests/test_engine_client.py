"""The engine client reads the engine's SSE body as bytes: chunks, bursts, the end of a stream, its errors.

The engine is an ``httpx.MockTransport`` that plays a scripted body in scripted pieces (a fake, not a mock).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gateway.engine.client import ChunkStream, Upstream
from gateway.errors import UpstreamError, UpstreamTimeout


class Pieces(httpx.AsyncByteStream):
    def __init__(self, pieces: list[bytes], delay_s: float = 0.0) -> None:
        self.pieces = pieces
        self.delay_s = delay_s

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            yield piece


def event(payload: dict[str, Any] | str) -> bytes:
    return b"data: " + (payload if isinstance(payload, str) else json.dumps(payload)).encode() + b"\n\n"


def read(pieces: list[bytes], *, delay_s: float = 0.0, total_timeout_s: float | None = None) -> list[Any]:
    """The chunks the stream gives, a list per ``batch()`` (one read's worth)."""
    seen: list[Any] = []
    bodies: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(request.content)
        return httpx.Response(200, stream=Pieces(pieces, delay_s), headers={"content-type": "text/event-stream"})

    async def run() -> None:
        upstream = Upstream("http://engine", transport=httpx.MockTransport(handler))
        try:
            async with upstream.stream(
                "/v1/completions", {"prompt": "é", "n": 1}, request_id="r1", total_timeout_s=total_timeout_s
            ) as chunks:
                while batch := await chunks.batch():
                    seen.append(batch)
        finally:
            await upstream.aclose()

    asyncio.run(run())
    assert json.loads(bodies[0]) == {"prompt": "é", "n": 1}  # the body is the JSON httpx's json= would send
    return seen


def test_the_chunks_of_one_read_come_as_one_batch_and_the_end_as_an_empty_one() -> None:
    a, b, c = ({"choices": [{"text": t}]} for t in "abc")
    seen = read([event(a) + event(b), event(c), event("[DONE]")])
    assert seen == [[a, b], [c]]


def test_iterating_a_stream_gives_its_chunks_one_by_one() -> None:
    async def run() -> list[Any]:
        pieces = iter([event({"x": 1}) + event({"x": 2}), event({"x": 3}) + event("[DONE]"), b""])

        async def read() -> bytes:
            return next(pieces)

        return [chunk async for chunk in ChunkStream(read)]

    assert asyncio.run(run()) == [{"x": 1}, {"x": 2}, {"x": 3}]


def test_events_split_anywhere_and_with_crlf_decode_alike() -> None:
    body = (event({"x": 1}) + b": comment\r\n" + event({"x": 2}) + event("[DONE]")).replace(b"\n", b"\r\n")
    pieces = [body[i : i + 3] for i in range(0, len(body), 3)]
    assert [chunk for batch in read(pieces) for chunk in batch] == [{"x": 1}, {"x": 2}]


def test_a_responses_stream_ends_at_its_end_event_without_done() -> None:
    done = {"type": "response.completed", "response": {}}
    seen = read([event({"type": "response.output_text.delta"}) + event(done) + event({"type": "late"})])
    assert seen == [[{"type": "response.output_text.delta"}, done]]


@pytest.mark.parametrize(
    ("pieces", "message"),
    [
        ([event({"x": 1})], "ended without \\[DONE\\]"),
        ([b"data: {not json\n\n"], "malformed stream chunk"),
        ([b"data: [1, 2]\n\n"], "malformed stream chunk"),
        ([b"data: \xff\n\n"], "malformed stream chunk"),
        ([event({"error": {"message": "engine broke"}})], "failed mid-stream: engine broke"),
    ],
)
def test_a_broken_stream_is_an_upstream_error(pieces: list[bytes], message: str) -> None:
    with pytest.raises(UpstreamError, match=message):
        read(pieces)


def test_the_chunks_read_before_a_break_in_the_same_read_are_given_before_the_error() -> None:
    async def run() -> tuple[list[Any], Exception]:
        pieces = iter([event({"x": 1}) + event({"x": 2}) + event({"error": {"message": "engine broke"}}) + event({})])

        async def read() -> bytes:
            return next(pieces)

        stream = ChunkStream(read)
        first = await stream.batch()
        with pytest.raises(UpstreamError) as broke:
            await stream.batch()
        return first, broke.value

    first, error = asyncio.run(run())
    assert first == [{"x": 1}, {"x": 2}] and "engine broke" in str(error)


def test_a_stream_past_its_total_timeout_ends_with_upstream_timeout() -> None:
    with pytest.raises(UpstreamTimeout, match="total timeout of 0.05 s"):
        read([event({"x": i}) for i in range(20)] + [event("[DONE]")], delay_s=0.01, total_timeout_s=0.05)
