"""Load generator: drive one or more OpenAI-compatible targets and report latency, throughput, EM and tokens.

    python -m loadtest.load --rate 2 --duration 30                       # the gateway on 127.0.0.1:8000
    python -m loadtest.load --rate 1,2,4,8 --duration 20 --out results/sweep   # a rate sweep
    python -m loadtest.load --concurrency 8 --no-stream --api chat
    python -m loadtest.load --rate 4 \\
        --target direct=http://127.0.0.1:8100 --target gateway=http://127.0.0.1:8000
    python -m loadtest.load --rate 4 \\
        --target none='http://127.0.0.1:8000,body={"stopgate": {"policy": "none"}}' \\
        --target b32='http://127.0.0.1:8000,body={"stopgate": {"policy": "budget", "budget": 32}}'

Load. ``--rate R`` is open loop: Poisson arrivals (seeded) at R requests/s per
target, sent whether or not earlier ones finished. ``--concurrency C`` is a
closed loop: C workers per target, each sending its next request when the
previous one ends. A comma list (``--rate 1,2,4``) is a sweep, one step per
value. Each step offers ``--duration`` seconds of load to each target.

Side by side. With several ``--target NAME=URL[,body=JSON]`` the step's time
is cut into ``--block``-second slots taken by the targets in turn (A B A B
...), so machine noise hits all of them alike and no two compete for the
engine at once; ratios are printed against the first target. ``body`` is
merged (recursively) into every request to that target, e.g. a ``stopgate``
override or another ``model``. A request still running when its target's slot
ends finishes in the next one.

Bounds. Every step ends after its time (plus at most ``--drain`` seconds for
requests in flight, which are then cancelled and counted as ``unfinished``)
or ``--requests`` per target; a request is cut at ``--timeout``; arrivals that
find ``--max-in-flight`` requests open are dropped (``shed``). Only loopback
targets are driven unless ``--allow-remote``. Ctrl-C or SIGTERM stops at once
and still writes what was measured, marked ``"complete": false`` (exit 130).

Prompts come from reference sets (``--references``, default
``references/arith-test.jsonl``) or ``--prompts FILE`` (JSONL, one
``{"prompt": ...}`` or ``{"messages": [...]}`` per line, optional
``"answers"``), used in order and cycled. Items with answers are scored for EM
(``--extractor``, ``--normalizer``).

Measures (per request; definitions in ``loadtest/stats.py``): E2E from the
scheduled send time to the last byte; TTFT to the first chunk with text; TPOT
= (E2E - TTFT) / (output tokens - 1); ITL = the gaps between streamed chunks
that carry text. Throughput = successful requests (output tokens) per second
of load offered to the target. Tokens by kind and stop reasons come from the
gateway's ``stopgate`` extension; without it (an engine direct) only
``usage`` is reported.

Output in ``--out``: ``load.json`` (config, per step and target summaries,
ratios), ``requests.csv`` (one row per request), ``summary.csv``, and PNGs:
``latency_cdf.png``, ``throughput.png``, ``em_tokens.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
from pathlib import Path
from typing import Any, Literal

import httpx

from gateway.evaluation import get_extractor, get_normalizer
from loadtest.common import REPO, Prompt, UsageError, check_loopback, load_prompts
from loadtest.load_types import MAX_REQUESTS, LoadConfig, Target
from loadtest.runner import preflight, run_load
from loadtest.stats import write_outputs

MAX_DURATION_S = 3600.0
MAX_RATE = 10_000.0
MAX_CONCURRENCY = 4096


def parse_target(text: str) -> Target:
    """``NAME=URL[,body=JSON]`` or a bare URL (named by its port)."""
    name, sep, rest = text.partition("=")
    if not sep or "://" in name:
        name, rest = "", text
    url, sep, body_text = rest.partition(",body=")
    body: Any = {}
    if sep:
        try:
            body = json.loads(body_text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--target {text!r}: body is not valid JSON ({exc.msg})") from exc
        if not isinstance(body, dict):
            raise UsageError(f"--target {text!r}: body must be a JSON object")
    url = url.strip().rstrip("/").removesuffix("/v1")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise UsageError(f"--target {text!r}: bad URL ({exc})") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise UsageError(f"--target {text!r}: the URL needs http:// or https:// and a host")
    return Target(name or f"{parsed.host}:{parsed.port or 80}", url, body)


def _levels(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number or comma list of numbers: {text!r}") from exc
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"must be positive numbers: {text!r}")
    return values


def _positive(kind: type[int] | type[float], most: float) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not a{'n integer' if kind is int else ' number'}: {text!r}") from exc
        if not (math.isfinite(value) and 0 < value <= most):
            raise argparse.ArgumentTypeError(f"must be > 0 and <= {most:g}: {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest.load", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--target", action="append", metavar="NAME=URL[,body=JSON]", help="default: the gateway on :8000")
    load = ap.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=_levels, help="open loop: Poisson arrivals per second per target (list: sweep)")
    load.add_argument("--concurrency", type=_levels, help="closed loop: workers per target (list: sweep)")
    ap.add_argument("--duration", type=_positive(float, MAX_DURATION_S), default=10.0, help="seconds per target/step")
    ap.add_argument("--requests", type=_positive(int, MAX_REQUESTS), help="at most this many per target and step")
    ap.add_argument("--block", type=_positive(float, MAX_DURATION_S), default=2.0, help="seconds per target slot")
    ap.add_argument("--drain", type=float, default=60.0, help="seconds to wait for requests in flight after a step")
    ap.add_argument("--timeout", type=_positive(float, MAX_DURATION_S), default=300.0, help="seconds per request")
    ap.add_argument("--max-in-flight", type=_positive(int, 65536), default=256)
    ap.add_argument("--api", choices=("completions", "chat"), default="completions")
    ap.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--model", default="tinyreason")
    ap.add_argument("--max-tokens", type=_positive(int, 1 << 20))
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--references", type=Path, action="append", help="reference set JSONL (repeatable)")
    ap.add_argument("--prompts", type=Path, action="append", help='JSONL of {"prompt"} or {"messages"} (repeatable)')
    ap.add_argument("--limit", type=_positive(int, MAX_REQUESTS), help="use the first N prompts")
    ap.add_argument("--shuffle", action="store_true", help="shuffle the prompts (seeded)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extractor", default="gsm8k", help="answer extractor for EM (gsm8k, boxed, last_number, regex)")
    ap.add_argument("--extractor-pattern", help="the regex of --extractor regex")
    ap.add_argument("--normalizer", default="number", help="answer normaliser for EM (number, text, exact)")
    ap.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY' to every target (never written out)")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "load")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--allow-remote", action="store_true", help="allow targets that are not loopback addresses")
    ap.add_argument("--quiet", action="store_true", help="no progress line")
    return ap


def config_from_args(args: argparse.Namespace) -> tuple[LoadConfig, list[Prompt]]:
    """Validate everything that can be checked before a request is sent; UsageError otherwise."""
    targets = [parse_target(t) for t in args.target or ["gateway=http://127.0.0.1:8000"]]
    if len({t.name for t in targets}) != len(targets):
        raise UsageError("--target names must be unique")
    if not args.allow_remote:
        for t in targets:
            check_loopback(t.url, t.name)
    if not (math.isfinite(args.drain) and 0 <= args.drain <= MAX_DURATION_S):
        raise UsageError(f"--drain must be between 0 and {MAX_DURATION_S:g} seconds")
    if args.block > args.duration and len(targets) > 1:
        raise UsageError("--block must not exceed --duration")
    try:
        get_extractor(args.extractor, args.extractor_pattern)
        get_normalizer(args.normalizer)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    mode: Literal["rate", "concurrency"] = "rate" if args.rate else "concurrency"
    levels = args.rate or args.concurrency
    if mode == "concurrency" and not all(v == int(v) and v <= MAX_CONCURRENCY for v in levels):
        raise UsageError(f"--concurrency must be whole numbers <= {MAX_CONCURRENCY}")
    if mode == "rate" and (max(levels) > MAX_RATE or max(levels) * args.duration > MAX_REQUESTS):
        raise UsageError(f"--rate must be <= {MAX_RATE:g} and rate x duration <= {MAX_REQUESTS}")
    sources = [*(("references", p) for p in args.references or []), *(("prompts", p) for p in args.prompts or [])]
    if not sources:
        sources = [("references", REPO / "references" / "arith-test.jsonl")]
    prompts = load_prompts(sources, api=args.api)
    if args.shuffle:
        random.Random(args.seed).shuffle(prompts)
    if args.limit:
        prompts = prompts[: args.limit]
    config = LoadConfig(
        targets=tuple(targets),
        mode=mode,
        steps=tuple(tuple(v for _ in targets) for v in levels),
        duration_s=args.duration,
        requests=args.requests,
        block_s=args.block,
        drain_s=args.drain,
        timeout_s=args.timeout,
        max_in_flight=args.max_in_flight,
        api=args.api,
        stream=args.stream,
        model=args.model,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        extractor=args.extractor,
        extractor_pattern=args.extractor_pattern,
        normalizer=args.normalizer,
        progress=not args.quiet,
        api_key=args.api_key,
    )
    return config, prompts


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config, prompts = config_from_args(args)
        asyncio.run(preflight(config))
    except UsageError as exc:
        print(f"load: error: {exc}", file=sys.stderr)
        return 2
    result = asyncio.run(run_load(config, prompts))
    paths = write_outputs(result, args.out, plots=not args.no_plots)
    print("wrote " + ", ".join(str(p) for p in paths))
    if not result.complete:
        print("load: interrupted; the results so far are marked complete: false", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
