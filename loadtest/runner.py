"""Load generator: the open- and closed-loop ``Runner`` that drives OpenAI-compatible targets.

``LoadConfig`` describes one invocation (targets, steps of rates or concurrencies, bounds);
``Runner`` sends the requests, open loop (seeded Poisson arrivals) or closed loop (workers),
with several targets taking turns in ``block``-second slots, and records each request
(``loadtest.load_types.Record``); ``preflight`` checks the targets first and ``run_load`` runs every
step, stopping early on SIGINT/SIGTERM. The command line, and the documentation of the modes,
bounds, measures and outputs, are in ``loadtest/load.py`` (``python -m loadtest.load``).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import httpx

from gateway.evaluation import exact_match, get_extractor, get_normalizer
from loadtest.common import Prompt, UsageError
from loadtest.load_types import MAX_REQUESTS, LoadConfig, LoadResult, Record, StepResult, Target
from loadtest.stats import gaps, print_step


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` merged into ``base``; nested objects merge, everything else is replaced."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def slot_wall(i: int, n: int, block: float, t: float) -> float:
    """Wall time (since the step began) of target ``i``'s active second ``t`` when ``n`` targets take turns."""
    if n == 1:
        return t
    k = math.floor(t / block)
    return (k * n + i) * block + (t - k * block)


def step_wall(n: int, block: float, duration: float) -> float:
    """Wall seconds of a step in which ``n`` targets each get ``duration`` seconds in turns of ``block``."""
    if n == 1:
        return duration
    k = math.ceil(duration / block) - 1  # the last target's last (maybe partial) slot
    return (k * n + n - 1) * block + (duration - k * block)


def active_seconds(i: int, n: int, block: float, wall: float, duration: float) -> float:
    """Seconds of load target ``i`` was offered by ``wall`` seconds into the step."""
    if n == 1:
        return min(wall, duration)
    rounds, offset = divmod(wall, n * block)
    return min(duration, rounds * block + min(block, max(0.0, offset - i * block)))


def poisson_schedule(rate: float, duration: float, cap: int | None, rng: random.Random) -> list[float]:
    times: list[float] = []
    t = rng.expovariate(rate)
    while t < duration and (cap is None or len(times) < cap) and len(times) < MAX_REQUESTS:
        times.append(t)
        t += rng.expovariate(rate)
    return times


class Runner:
    """Runs the steps of one config; ``stop`` ends it early (results so far are kept)."""

    def __init__(self, config: LoadConfig, prompts: Sequence[Prompt], stop: asyncio.Event | None = None) -> None:
        self.config = config
        self.prompts = list(prompts)
        self.stop = stop or asyncio.Event()
        self.records: list[Record] = []
        self.steps: list[StepResult] = []
        self.extract = get_extractor(config.extractor, config.extractor_pattern)
        self.normalize = get_normalizer(config.normalizer)
        self._cancel_kind = "unfinished"
        self._next_item = [0] * len(config.targets)  # each target walks the prompts in the same order
        self._step_t0, self._step_wall = 0.0, 0.0
        self._counts = {"sent": 0, "done": 0, "failed": 0}
        self._in_flight: set[asyncio.Task[None]] = set()
        self._status = ""

    async def run(self) -> LoadResult:
        started, t0 = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), time.monotonic()
        c = self.config
        limits = httpx.Limits(max_connections=c.max_in_flight + 8, max_keepalive_connections=c.max_in_flight + 8)
        timeout = httpx.Timeout(connect=5.0, read=c.timeout_s, write=10.0, pool=c.timeout_s)
        progress = asyncio.create_task(self._progress()) if c.progress else None
        try:
            async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=c.headers) as client:
                for k, levels in enumerate(c.steps):
                    if self.stop.is_set():
                        break
                    await self._step(client, k, levels)
        finally:
            if progress is not None:
                progress.cancel()
                await asyncio.gather(progress, return_exceptions=True)
                print(file=sys.stderr)
        complete = not self.stop.is_set() and len(self.steps) == len(c.steps)
        return LoadResult(c, len(self.prompts), self.records, self.steps, complete, started, time.monotonic() - t0)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, waking early when the run is stopped."""
        if seconds > 0 and not self.stop.is_set():
            try:
                await asyncio.wait_for(self.stop.wait(), seconds)
            except TimeoutError:
                pass

    async def _step(self, client: httpx.AsyncClient, k: int, levels: tuple[float, ...]) -> None:
        c, loop = self.config, asyncio.get_running_loop()
        n, t0 = len(c.targets), loop.time()
        unit = "/s" if c.mode == "rate" else " workers"
        self._status = f"step {k + 1}/{len(c.steps)} " + " ".join(
            f"{t.name}={lv:g}{unit}" for t, lv in zip(c.targets, levels, strict=True)
        )
        self._step_t0, self._step_wall = t0, step_wall(n, c.block_s, c.duration_s)
        self._counts = {"sent": 0, "done": 0, "failed": 0}
        if c.mode == "rate":
            await self._open_loop(client, k, levels, t0)
            if c.requests is None:  # throughput is per second offered: the window runs to its end
                await self._sleep(t0 + self._step_wall - loop.time())
        else:
            workers = [
                asyncio.create_task(self._worker(client, k, i, t0, w, int(levels[i])))
                for i in range(n)
                for w in range(int(levels[i]))
            ]
            self._in_flight.update(workers)
            for task in workers:
                task.add_done_callback(self._in_flight.discard)
        await self._drain(t0 + self._step_wall + c.drain_s)
        wall = loop.time() - t0
        seconds = {t.name: active_seconds(i, n, c.block_s, wall, c.duration_s) for i, t in enumerate(c.targets)}
        self.steps.append(StepResult(k, {t.name: lv for t, lv in zip(c.targets, levels, strict=True)}, seconds, wall))
        if c.progress:
            print(file=sys.stderr)
        print_step(self.steps[-1], [r for r in self.records if r.step == k], c)

    async def _open_loop(self, client: httpx.AsyncClient, k: int, levels: tuple[float, ...], t0: float) -> None:
        c, loop = self.config, asyncio.get_running_loop()
        rng = random.Random(c.seed * 1_000_003 + k)
        n = len(c.targets)
        schedule = sorted(
            (slot_wall(i, n, c.block_s, t), i)
            for i in range(n)
            for t in poisson_schedule(levels[i], c.duration_s, c.requests, rng)
        )
        seq = [0] * n
        for at, i in schedule:
            await self._sleep(t0 + at - loop.time())
            if self.stop.is_set():
                return
            item = self._take_item(i)
            if len(self._in_flight) >= c.max_in_flight:
                self.records.append(Record(c.targets[i].name, k, seq[i], item, at, error="shed"))
                self._counts["failed"] += 1
            else:
                task = asyncio.create_task(self._send(client, k, i, seq[i], item, at, t0 + at))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
            seq[i] += 1

    async def _worker(self, client: httpx.AsyncClient, k: int, i: int, t0: float, w: int, workers: int) -> None:
        """One closed-loop worker of target ``i``: next request when the last ends, only in ``i``'s slots."""
        c, loop = self.config, asyncio.get_running_loop()
        n, period, sent = len(c.targets), len(c.targets) * c.block_s, 0
        while not self.stop.is_set():
            now = loop.time() - t0
            if active_seconds(i, n, c.block_s, now, c.duration_s) >= c.duration_s:
                return
            if c.requests is not None and sent >= math.ceil((c.requests - w) / workers):
                return
            if n > 1 and int((now % period) // c.block_s) != i:
                start = math.floor(now / period) * period + i * c.block_s
                await self._sleep((start if start > now else start + period) - now)
                continue
            await self._send(client, k, i, sent * workers + w, self._take_item(i), now, t0 + now)
            sent += 1

    async def _drain(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while self._in_flight and not self.stop.is_set() and loop.time() < deadline:
            stopper = asyncio.ensure_future(self.stop.wait())
            wait = deadline - loop.time()
            await asyncio.wait({*self._in_flight, stopper}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
        self._cancel_kind = "cancelled" if self.stop.is_set() else "unfinished"
        pending = list(self._in_flight)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _take_item(self, i: int) -> int:
        item = self._next_item[i] % len(self.prompts)
        self._next_item[i] += 1
        return item

    def body(self, target: Target, prompt: Prompt) -> dict[str, Any]:
        c = self.config
        body: dict[str, Any] = {"model": c.model}
        if c.api == "chat":
            body["messages"] = prompt.as_messages()
        else:
            body["prompt"] = prompt.prompt
        if c.max_tokens is not None:
            body["max_tokens"] = c.max_tokens
        if c.temperature is not None:
            body["temperature"] = c.temperature
        body["stream"] = c.stream
        if c.stream:
            body["stream_options"] = {"include_usage": True}
        return merge(body, target.body)

    async def _send(
        self, client: httpx.AsyncClient, k: int, i: int, seq: int, item: int, at: float, due: float
    ) -> None:
        c, loop, target = self.config, asyncio.get_running_loop(), self.config.targets[i]
        prompt = self.prompts[item]
        rec = Record(target.name, k, seq, item, at)
        now = loop.time()
        rec.lag_s, start = max(0.0, now - due), min(now, due)  # latency counts from the schedule, never less
        path = "/v1/chat/completions" if c.api == "chat" else "/v1/completions"
        self._counts["sent"] += 1
        text, ext = "", None
        try:
            async with asyncio.timeout(c.timeout_s):
                if c.stream:
                    text, ext = await self._stream(client, target.url + path, self.body(target, prompt), rec, start)
                else:
                    response = await client.post(target.url + path, json=self.body(target, prompt))
                    rec.status = response.status_code
                    if response.status_code != 200:
                        rec.error = f"http_{response.status_code}"
                    else:
                        data = response.json()
                        choice = data["choices"][0]
                        text = choice["text"] if c.api == "completions" else choice["message"]["content"] or ""
                        rec.usage, ext = data.get("usage"), data.get("stopgate")
                rec.e2e_s = loop.time() - start
        except TimeoutError:
            rec.error = "timeout"
        except httpx.ConnectError:
            rec.error = "connect"
        except httpx.TimeoutException:
            rec.error = "timeout"
        except httpx.HTTPError:
            rec.error = "transport"
        except (ValueError, KeyError, IndexError, TypeError):
            rec.error = "invalid_response"
        except asyncio.CancelledError:
            rec.error = self._cancel_kind
            raise
        finally:
            self._finish(rec, prompt, text, ext)

    async def _stream(
        self, client: httpx.AsyncClient, url: str, body: dict[str, Any], rec: Record, start: float
    ) -> tuple[str, Any]:
        loop, parts, times, ext = asyncio.get_running_loop(), [], [], None
        async with client.stream("POST", url, json=body) as response:
            rec.status = response.status_code
            if response.status_code != 200:
                await response.aread()
                rec.error = f"http_{response.status_code}"
                return "", None
            async for line in response.aiter_lines():  # read to the end so the connection is reused
                if not line.startswith("data:") or (data := line[5:].strip()) == "[DONE]":
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    rec.error = "stream_error"
                    continue
                for choice in chunk.get("choices") or []:
                    piece = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                    if piece:
                        times.append(loop.time() - start)
                        parts.append(piece)
                if chunk.get("usage"):
                    rec.usage = chunk["usage"]
                if isinstance(chunk.get("stopgate"), dict):
                    ext = chunk["stopgate"]
        rec.ttft_s = times[0] if times else None
        rec.itl_s, rec.chunks = gaps(times), len(times)
        return "".join(parts), ext

    def _finish(self, rec: Record, prompt: Prompt, text: str, ext: Any) -> None:
        if rec.ok:
            usage = rec.usage or {}
            tokens = usage.get("completion_tokens")
            rec.output_tokens = int(tokens) if isinstance(tokens, int) else (rec.chunks if self.config.stream else None)
            if prompt.answers:
                rec.correct = exact_match(text, prompt.answers, extractor=self.extract, normalizer=self.normalize)
            if isinstance(ext, dict):
                rec.stop_reason = ext.get("stop_reason")
                if isinstance(ext.get("tokens"), dict):
                    rec.tokens = {k: int(v) for k, v in ext["tokens"].items() if isinstance(v, int)}
        self.records.append(rec)
        self._counts["done" if rec.ok else "failed"] += 1

    async def _progress(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0.5)
            if not self._status:
                continue
            elapsed = loop.time() - self._step_t0
            n = self._counts
            line = (
                f"\rload: {self._status}  {elapsed:5.1f}/{self._step_wall:.0f}s  sent {n['sent']}  "
                f"ok {n['done']}  failed {n['failed']}  in flight {len(self._in_flight)}"
            )
            print(f"{line:<100}", end="", file=sys.stderr, flush=True)


async def preflight(config: LoadConfig) -> None:
    """Every target answers ``GET /v1/models`` and serves the model it will be asked for; else UsageError."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(5.0), headers=config.headers) as client:
        for target in config.targets:
            url = f"{target.url}/v1/models"
            try:
                response = await client.get(url)
            except httpx.HTTPError as exc:
                raise UsageError(f"target {target.name}: cannot reach {url} ({type(exc).__name__})") from exc
            if response.status_code != 200:
                raise UsageError(f"target {target.name}: {url} answered HTTP {response.status_code}")
            try:
                served = {m["id"] for m in response.json()["data"]}
            except (ValueError, KeyError, TypeError) as exc:
                raise UsageError(f"target {target.name}: {url} is not an OpenAI model list") from exc
            model = target.body.get("model", config.model)
            if model not in served:
                raise UsageError(
                    f"target {target.name} does not serve model {model!r} (it serves {', '.join(sorted(served))})"
                )


async def run_load(config: LoadConfig, prompts: Sequence[Prompt], stop: asyncio.Event | None = None) -> LoadResult:
    """Run every step; SIGINT/SIGTERM (or ``stop``) end it early with the results so far."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    handled = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
        except (RuntimeError, ValueError):  # not the main thread
            pass
    try:
        return await Runner(config, prompts, stop).run()
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
