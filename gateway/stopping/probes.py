"""Answer probes that run beside the main stream, never pausing it.

``launch`` returns at once; results reach the policy through ``on_result``.
While ``max_inflight_probes`` run, a launch is skipped rather than cancelling
the oldest (under load that would cancel every probe before it answers),
unless the oldest is ``STALE_TOKENS`` behind: a stuck probe must not block
probing for the rest of the request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from gateway.engine.client import ChunkSource
from gateway.errors import GatewayError
from gateway.evaluation import Extractor, Normalizer
from gateway.openai.chunks import ChunkParser
from gateway.stopping.continuation import token_logprobs
from gateway.stopping.rendered import Continuer
from policies.base import ProbeResult

log = logging.getLogger("stopgate.probes")

# A running probe launched this many reasoning tokens ago may be replaced by a new one.
STALE_TOKENS = 64


@dataclass
class ProbeStats:
    launched: int = 0
    completed: int = 0
    cancelled: int = 0
    skipped: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    durations: list[float] = field(default_factory=list)  # one per probe that ran, for the latency histogram


class Probes:
    def __init__(
        self,
        continuer: Continuer,
        *,
        extractor: Extractor,
        normalizer: Normalizer,
        logprobs: bool,
        on_result: Callable[[ProbeResult], None],
    ) -> None:
        # How a probe reaches the engine (gateway/stopping/rendered.py): the request's generation shares its own.
        self.continuer = continuer
        self.route = continuer.route
        self.request_id = continuer.request_id
        self.extractor = extractor
        self.normalizer = normalizer
        self.logprobs = logprobs
        self.on_result = on_result
        self.max_probes = self.route.max_probes
        self.stats = ProbeStats()
        self._inflight: list[asyncio.Task[None]] = []
        self._launched_at: dict[asyncio.Task[None], int] = {}

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def launch(self, at_tokens: int, generated: str) -> bool:
        """Start a probe on ``generated`` (the output so far, as a continuation repeats it).

        False if the per-request bound is reached or too many are running.
        """
        if self.stats.launched >= self.max_probes:
            return False
        if len(self._inflight) >= self.route.max_inflight_probes:
            oldest = self._inflight[0]
            if at_tokens - self._launched_at.get(oldest, at_tokens) < STALE_TOKENS:
                self.stats.skipped += 1
                return False
            self._inflight.pop(0).cancel()
            self.stats.cancelled += 1
        self.stats.launched += 1
        task = asyncio.ensure_future(self._run(self.stats.launched, at_tokens, generated))
        self._inflight.append(task)
        self._launched_at[task] = at_tokens
        task.add_done_callback(self._forget)
        return True

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._launched_at.pop(task, None)
        if task in self._inflight:
            self._inflight.remove(task)

    async def _run(self, number: int, at_tokens: int, generated: str) -> None:
        pieces: list[str] = []
        lps: list[float] = []
        started = time.monotonic()
        counted_prompt = False
        try:
            async with self.continuer.stream(
                generated,
                self.route.probe_suffix,
                max_tokens=self.route.probe_max_tokens,
                greedy=True,
                logprobs=self.logprobs,
                request_id=f"{self.request_id}-probe{number}",
            ) as stream:
                parser = ChunkParser(self.continuer.shape)
                async for chunk in stream:
                    usage = chunk.get("usage")
                    if isinstance(usage, dict) and not counted_prompt and usage.get("prompt_tokens"):
                        self.stats.prompt_tokens += int(usage["prompt_tokens"])
                        counted_prompt = True
                    if not chunk.get("choices"):
                        continue
                    for delta in parser.parse(chunk):
                        pieces.append(delta.reasoning + delta.text)  # a parser may file it under either
                        self.stats.completion_tokens += delta.tokens
                        lps.extend(token_logprobs(delta.logprobs))
        except GatewayError as exc:
            self.stats.failed += 1
            log.warning("probe %s of %s failed: %s", number, self.request_id, exc.message)
            return
        finally:
            elapsed = time.monotonic() - started
            self.stats.seconds += elapsed
            self.stats.durations.append(elapsed)
        self.stats.completed += 1
        text = "".join(pieces)
        raw = self.extractor(self.route.probe_suffix + text)
        answer = self.normalizer(raw) if raw is not None else None
        finite = tuple(lp for lp in lps if math.isfinite(lp))
        self.on_result(ProbeResult(at_tokens, answer or None, text, finite if self.logprobs else None))

    async def aclose(self) -> None:
        """Cancel every running probe and wait for each to let go of its connection."""
        if not self._inflight:
            return  # the usual case: nothing to cancel, so no shielded scope to pay for
        tasks, self._inflight = self._inflight, []
        for task in tasks:
            task.cancel()
        self.stats.cancelled += sum(1 for t in tasks if not t.done())
        with anyio.CancelScope(shield=True):
            for task in tasks:
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass


class UntilStopped:
    """An engine stream's bursts (``ChunkSource.batch``), ending early once ``stop_event`` is set.

    While no probe is running only the stream itself can say stop, so ``next()``
    is the stream's own read, with no task or wrapper in between (this runs for
    every burst of every request); with probes in flight each read races the
    stop event. ``[]``: the stream ended, or a stop came. ``aclose()`` lets go
    of a read still pending, which must happen before the stream is closed.
    """

    def __init__(self, stream: ChunkSource, stop_event: asyncio.Event, probes: Probes | None) -> None:
        self._stream, self._stop, self._probes = stream, stop_event, probes
        self._pending: asyncio.Future[list[dict[str, Any]]] | None = None

    def next(self) -> Awaitable[list[dict[str, Any]]]:
        if self._pending is None and not self._stop.is_set() and (self._probes is None or not self._probes.inflight):
            return self._stream.batch()
        return self._race()

    async def _race(self) -> list[dict[str, Any]]:
        while not self._stop.is_set():
            if self._pending is None:
                if self._probes is None or not self._probes.inflight:
                    return await self._stream.batch()
                self._pending = asyncio.ensure_future(self._stream.batch())
            stop_wait = asyncio.ensure_future(self._stop.wait())
            try:
                waiters: set[asyncio.Future[Any]] = {self._pending, stop_wait}
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop_wait.cancel()
            if self._pending.done():
                future, self._pending = self._pending, None
                return future.result()
            # A probe ended without a stop: race on while probes run, else wait on the read alone.
        return []

    async def aclose(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and not pending.done():
            pending.cancel()
            # Wait for the read to let go of the stream before it is closed,
            # even if we are being cancelled ourselves.
            with anyio.CancelScope(shield=True):
                await asyncio.wait({pending})
