"""The soak's load client (``loadtest/soak.py``), run in a process of its own so that its memory and CPU stay
out of what is measured.

``client_main`` waits for the ``go`` file, then keeps ``streams`` streams open in a closed loop (request, read
the SSE stream to ``[DONE]``, repeat) for ``duration`` s and lets the open streams finish (at most ``drain``
s). About once a second it writes its progress (phase, completed streams, streams in flight, errors by kind)
to the ``progress`` JSON file, which the soak's sampler reads. ``loadtest.soak`` starts it as
``python -m loadtest.soak --client-of URL --progress FILE --go FILE --streams N --duration S --drain S``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

# A prompt that matches no reference item: the controller gets no EM samples and keeps the route's budget
# (400 thinking tokens), so every answer streams whole and the load stays the same all run. ("Q: 1+2=?\n" is
# a reference item: the controller would search the budget down against a fake engine that cannot answer
# a forced-answer request, and the traffic mix would change mid-run.)
MODEL, PROMPT = "tinyreason", "Soak: what is 1+2?\n"
ANSWER = b"#### 3"  # every answer of the fake engine's --think script ends with it
DONE = b"data: [DONE]\n\n"
ERROR_EVENT = re.compile(rb'data: \{"error":\{.*?"type":"([^"]*)"')


class Client:
    """Closed-loop streaming clients; writes its progress to ``progress`` about once a second."""

    def __init__(self, url: str, streams: int, duration: float, drain: float, progress: Path, go: Path) -> None:
        self.url, self.streams, self.duration, self.drain, self.progress = url, streams, duration, drain, progress
        self.go = go  # the load starts once this file exists: the client imports while the servers start
        self.completed, self.completed_in_load, self.in_flight, self.cut = 0, 0, 0, 0
        self.errors: Counter[str] = Counter()
        self.phase, self.stopped = "starting", asyncio.Event()
        self.started_at: float | None = None  # wall clock when the load began
        self.body = json.dumps({"model": MODEL, "prompt": PROMPT, "stream": True}).encode()

    def state(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "started_at": self.started_at,
            "written_at": time.time(),
            "completed": self.completed,
            "completed_in_load": self.completed_in_load,
            "in_flight": self.in_flight,
            "errors": dict(self.errors),
            "cut_at_end": self.cut,
        }

    def write(self) -> None:
        tmp = self.progress.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state()))
        os.replace(tmp, self.progress)  # the sampler never reads half a file

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopped.set)
        while not (self.go.exists() or self.stopped.is_set()):
            await asyncio.sleep(0.05)
        if self.stopped.is_set():
            return
        limits = httpx.Limits(max_connections=self.streams, max_keepalive_connections=self.streams)
        timeout = httpx.Timeout(connect=10.0, read=60.0, write=10.0, pool=30.0)
        async with httpx.AsyncClient(base_url=self.url, limits=limits, timeout=timeout) as client:
            start = time.monotonic()
            self.started_at, self.phase = time.time(), "load"
            ramp = min(2.0, 0.1 * self.duration)  # spread the first connects
            workers = [
                asyncio.create_task(self._worker(client, start, ramp * i / self.streams)) for i in range(self.streams)
            ]
            reporter = asyncio.create_task(self._report())
            stopped = asyncio.create_task(self.stopped.wait())
            all_done = asyncio.create_task(asyncio.wait(workers))
            try:
                await asyncio.wait([stopped, all_done], timeout=self.duration, return_when=asyncio.FIRST_COMPLETED)
                if not (self.stopped.is_set() or all_done.done()):
                    self.phase = "drain"  # no new streams; the open ones may finish
                    await asyncio.wait([stopped, all_done], timeout=self.drain, return_when=asyncio.FIRST_COMPLETED)
                finished = all_done.done() and not self.stopped.is_set()
            finally:
                for task in (*workers, reporter, stopped, all_done):
                    task.cancel()
                await asyncio.gather(*workers, reporter, stopped, all_done, return_exceptions=True)
            crashed = [w.exception() for w in workers if not w.cancelled() and w.exception()]
            for exc in crashed[:3]:
                print(f"soak client: a worker failed: {exc!r}", file=sys.stderr)
            self.phase = "failed" if crashed else "done" if finished else "stopped" if self.stopped.is_set() else "cut"
            self.write()

    async def _report(self) -> None:
        while True:
            self.write()
            await asyncio.sleep(1.0)

    async def _worker(self, client: httpx.AsyncClient, start: float, offset: float) -> None:
        await asyncio.sleep(offset)
        end = start + self.duration
        while time.monotonic() < end and not self.stopped.is_set():
            self.in_flight += 1
            try:
                error = await self._one(client)
            except asyncio.CancelledError:
                self.cut += 1
                raise
            finally:
                self.in_flight -= 1
            if error:
                self.errors[error] += 1
                await asyncio.sleep(0.1)  # a dead gateway must not turn the client into a busy loop
            else:
                self.completed += 1
                self.completed_in_load += time.monotonic() <= end

    async def _one(self, client: httpx.AsyncClient) -> str:
        """One stream read to its end: "" if it ended with ``[DONE]`` after the answer, else the kind of error."""
        tail, answered = b"", False
        try:
            async with client.stream(
                "POST", "/v1/completions", content=self.body, headers={"content-type": "application/json"}
            ) as response:
                if response.status_code != 200:
                    await response.aread()
                    return f"HTTP {response.status_code}"
                async for chunk in response.aiter_raw():
                    window = tail + chunk
                    if b'data: {"error"' in window and (match := ERROR_EVENT.search(window)):
                        return f"error event: {match.group(1).decode(errors='replace')}"
                    answered = answered or ANSWER in window
                    tail = window[-64:]
        except httpx.HTTPError as exc:
            return type(exc).__name__
        if not tail.endswith(DONE):
            return "ended without [DONE]"
        return "" if answered else "no answer before [DONE]"


def client_main(url: str, streams: int, duration: float, drain: float, progress: Path, go: Path) -> int:
    try:
        from uvloop import run as run_loop  # the client's cost lands on the same CPUs as the gateway's
    except ImportError:
        from asyncio import run as run_loop  # type: ignore[assignment]
    run_loop(Client(url, streams, duration, drain, progress, go).run())
    return 0
