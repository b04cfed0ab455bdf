"""What the zero-token signals (the ``brake`` policy) would do on a route, read offline from full-length logprobs.

    .venv/bin/python -m loadtest.logprob_signals --gateway http://127.0.0.1:8000 [--limit 100]

Each item runs once at full length (greedy, policy ``none``, budget 400) with
the top 20 logprobs of every token. It prints:

* ThinkBrake: the gap between the top token and ``</think>`` at the start of
  each line (where the model starts its ``check`` line, and where it closes),
  and, per margin, how many items a ``brake`` with that margin would stop,
  how many before the gold answer is written, and the reasoning it would save;
* DeepConf: the lowest group confidence (mean over ``--window`` tokens of
  minus the mean top-5 logprob) of right and wrong traces, and the same
  counts per ``min_confidence``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
from pathlib import Path
from typing import Any

import httpx

from gateway.evaluation import exact_match, get_extractor, get_normalizer, load_reference_file
from loadtest.common import REPO
from loadtest.cues import gold_end

CLOSE = "</think>"


async def traces(url: str, items: list[Any], concurrency: int) -> list[dict[str, Any]]:
    extract, normalize = get_extractor("gsm8k"), get_normalizer("number")
    gate = asyncio.Semaphore(concurrency)
    out: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=300) as client:

        async def one(item: Any) -> None:
            stopgate = {"policy": "none", "budget": 400}  # an override: no EM sample, no controller budget
            body = {
                "model": "tinyreason",
                "prompt": item.prompt,
                "temperature": 0,
                "logprobs": 20,
                "stopgate": stopgate,
            }
            async with gate:
                r = await client.post(f"{url}/v1/completions", json=body)
            r.raise_for_status()
            choice = r.json()["choices"][0]
            text = choice["text"]
            lp = choice["logprobs"]
            thinking = text.split(CLOSE)[0]
            out.append(
                {
                    "right": bool(exact_match(text, item.answers, extractor=extract, normalizer=normalize)),
                    "gold": gold_end(thinking, item.answers) or len(thinking),
                    "length": len(thinking),
                    "tokens": lp["tokens"],
                    "top": [t or {} for t in lp["top_logprobs"]],
                }
            )

        await asyncio.gather(*(one(it) for it in items))
    return out


def line_starts(trace: dict[str, Any]) -> list[tuple[int, str, float]]:
    """(offset, token, top - </think> gap) at the first token of each line of the reasoning."""
    out, pos = [], 0
    tokens, tops = trace["tokens"], trace["top"]
    for i, token in enumerate(tokens):
        if i > 0 and tokens[i - 1].endswith("\n") and pos < trace["length"] + 1:
            close = tops[i].get(CLOSE)
            gap = max(tops[i].values()) - close if close is not None and tops[i] else math.inf
            out.append((pos, token, gap))
        pos += len(token)
    return out


def group_confidence(trace: dict[str, Any], window: int) -> list[tuple[int, float]]:
    """(offset, group confidence) over the reasoning, DeepConf's token confidence from the top 5 logprobs."""
    confs: list[float] = []
    out, pos = [], 0
    for token, top in zip(trace["tokens"], trace["top"], strict=True):
        values = sorted((v for v in top.values() if v > -1e9), reverse=True)[:5]
        confs.append(-sum(values) / len(values) if values else 0.0)
        pos += len(token)
        if len(confs) >= window and pos <= trace["length"]:
            out.append((pos, sum(confs[-window:]) / window))
    return out


def counts(rows: list[dict[str, Any]], first_stop: Any) -> str:
    stops = early = saved = full = 0
    for t in rows:
        full += t["length"]
        at = first_stop(t)
        if at is None:
            continue
        stops += 1
        early += at < t["gold"]
        saved += t["length"] - at
    return f"stops {stops}/{len(rows)}, {early} before the gold answer, reasoning saved {saved / max(1, full):.1%}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gateway", required=True)
    ap.add_argument("--references", type=Path, default=REPO / "references" / "arith-test.jsonl")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    if not 1 <= args.limit <= 10_000 or not 1 <= args.window <= 4096 or not 1 <= args.concurrency <= 64:
        ap.error("--limit 1..10000, --window 1..4096, --concurrency 1..64")
    items = list(load_reference_file(args.references))[: args.limit]
    rows = asyncio.run(traces(args.gateway.rstrip("/"), items, args.concurrency))
    starts = [line_starts(t) for t in rows]
    check = sorted(g for s in starts for _, tok, g in s if tok.startswith("c"))
    close = sorted(g for s in starts for _, tok, g in s if tok == CLOSE)
    print(f"{len(rows)} items, {sum(t['right'] for t in rows)} right at full length")
    if check:
        print(
            f"ThinkBrake: at the {len(check)} check lines </think> is {check[0]:.1f}-{check[-1]:.1f} nats below the top"
        )
    if close:
        print(f"  at the {len(close)} lines where the model closes: gap {close[0]:.1f}-{close[-1]:.1f}")
    for margin in (1, 4, 8, 10, 11, 12, 13):

        def brake(t: dict[str, Any], m: float = margin) -> int | None:
            return next((p for p, tok, g in line_starts(t) if tok != CLOSE and g <= m), None)

        print(f"  margin {margin:>2}: {counts(rows, brake)}")
    lows = [(t["right"], min((c for _, c in group_confidence(t, args.window)), default=math.inf)) for t in rows]
    right = [c for ok, c in lows if ok and c < math.inf]
    wrong = [round(c, 2) for ok, c in lows if not ok]
    if right:
        median = statistics.median(right)
        print(f"DeepConf (window {args.window}): lowest group confidence of right traces: median {median:.2f}")
        print(f"  (min {min(right):.2f}); of wrong traces: {wrong}")
    for threshold in (10.0, 10.5, 11.0, 11.2):

        def low(t: dict[str, Any], th: float = threshold) -> int | None:
            return next((p for p, c in group_confidence(t, args.window) if c < th), None)

        print(f"  min_confidence {threshold}: {counts(rows, low)}")


if __name__ == "__main__":
    main()
