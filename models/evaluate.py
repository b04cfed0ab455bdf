"""Measure the bundled model's answers and reasoning against an OpenAI-compatible server.

    .venv/bin/python models/evaluate.py --url http://127.0.0.1:8123 --model tinyreason \\
        --references references/arith-test.jsonl --out models/tinyreason/eval.json

    .venv/bin/python models/evaluate.py --url http://127.0.0.1:8123 --model tinyreason \\
        --fresh-seed 4242 --fresh-seed 5353 --fresh-count 150 --out models/tinyreason/eval-fresh.json

Every figure comes from greedy decoding (temperature 0) through /v1/completions:

* EM with no budget: the ``####`` answer, number-normalised, against the golds.
* Thinking length: tokens between ``<think>`` and ``</think>``. The tokenizer is
  character-level, so characters are tokens; median per difficulty tier.
* Overthinking: the share of thinking tokens written after the gold answer
  first appears in the thinking as a whole number.
* Corrected slips: the share of items whose thinking says `` wait ``.
* Forced before the check: the answer forced where the check pass would
  start, which is the cut an ideal stop policy makes on this task.
* EM against budget: the greedy thinking is cut at B tokens and the answer is
  forced with ``prompt + "<think>" + thinking[:B] + "</think>\\n####"``. When B
  covers the whole thinking the greedy answer is the answer, with no request.

The model card's figures are produced by this script; it prints a markdown
table and writes everything, per item included, as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gateway.evaluation import exact_match, load_reference_file  # noqa: E402
from models.task import THINK_CLOSE, THINK_OPEN, generate  # noqa: E402

DEFAULT_BUDGETS = (0, 8, 16, 32, 48, 64, 96, 128, 160, 192, 256)
FORCE_SUFFIX = THINK_CLOSE + "\n####"
SLIP_MARK = " wait "
CHECK_MARK = "check\n"


class EvaluationError(RuntimeError):
    """The server refused or failed a request; the run stops."""


@dataclass(frozen=True)
class Item:
    id: str
    prompt: str
    answers: tuple[str, ...]
    difficulty: int | str | None


@dataclass
class Result:
    id: str
    difficulty: int | str | None
    answers: tuple[str, ...]
    completion: str
    finish_reason: str | None
    completion_tokens: int | None
    thinking_tokens: int
    closed: bool
    correct: bool
    answer_at: int | None
    slip: bool
    check_at: int | None
    budget_correct: dict[int, bool] = field(default_factory=dict)
    before_check_correct: bool | None = None

    @property
    def after_answer(self) -> int:
        """Thinking tokens written after the gold answer first appeared (0 if it never did)."""
        return 0 if self.answer_at is None else self.thinking_tokens - self.answer_at


# --- pure parts: parsing and scoring ------------------------------------------


def split_completion(text: str) -> tuple[str, bool, str]:
    """(thinking, closed, answer part) of a completion that opens with ``<think>``."""
    start = text.find(THINK_OPEN)
    body = text[start + len(THINK_OPEN) :] if start != -1 else text
    end = body.find(THINK_CLOSE)
    if end == -1:
        return body, False, ""
    return body[:end], True, body[end + len(THINK_CLOSE) :]


def answer_end(thinking: str, answer: str) -> int | None:
    """Index just past the first whole-number occurrence of ``answer`` in ``thinking``."""
    match = re.search(rf"(?<!\d){re.escape(answer)}(?!\d)", thinking)
    return None if match is None else match.end()


def score(text: str, answers: Sequence[str]) -> bool:
    return exact_match(text, answers) == 1.0


def make_result(item: Item, text: str, finish_reason: str | None, completion_tokens: int | None) -> Result:
    thinking, closed, answer_part = split_completion(text)
    return Result(
        id=item.id,
        difficulty=item.difficulty,
        answers=item.answers,
        completion=text,
        finish_reason=finish_reason,
        completion_tokens=completion_tokens,
        thinking_tokens=len(thinking),
        closed=closed,
        correct=closed and score(answer_part, item.answers),
        answer_at=answer_end(thinking, item.answers[0]),
        slip=SLIP_MARK in thinking,
        check_at=thinking.find(CHECK_MARK) if CHECK_MARK in thinking else None,
    )


def forced_prompt(item: Item, result: Result, budget: int) -> str:
    thinking, _, _ = split_completion(result.completion)
    return item.prompt + THINK_OPEN + thinking[:budget] + FORCE_SUFFIX


def _tier_key(tier: int | str | None) -> tuple[int, str]:
    return (0, f"{tier:09d}") if isinstance(tier, int) else (1, str(tier))


def summarize(results: Sequence[Result], budgets: Sequence[int]) -> dict[str, Any]:
    """Every figure of the model card, from per-item results."""
    n = len(results)
    tiers = sorted({r.difficulty for r in results}, key=_tier_key)
    by_tier = {t: [r for r in results if r.difficulty == t] for t in tiers}
    medians = {str(t): statistics.median(r.thinking_tokens for r in rs) for t, rs in by_tier.items()}
    easiest, hardest = medians[str(tiers[0])], medians[str(tiers[-1])]
    thinkers = [r for r in results if r.thinking_tokens > 0]
    checked = [r for r in results if r.check_at is not None]
    total_thinking = sum(r.thinking_tokens for r in results)
    full_mean = total_thinking / n
    rows = []
    for b in budgets:
        used = [min(b, r.thinking_tokens) for r in results]
        rows.append(
            {
                "budget": b,
                "em": sum(r.budget_correct[b] for r in results) / n,
                "mean_thinking_tokens": sum(used) / n,
                "token_share": sum(used) / total_thinking if total_thinking else 0.0,
                "forced": sum(b < r.thinking_tokens for r in results),
            }
        )
    # Usage counts every generated token: <think>, thinking, </think>, the
    # answer part, and EOS when the model stopped by itself.
    tokens_match = [
        r.completion_tokens == len(r.completion) - len(THINK_OPEN) - len(THINK_CLOSE) + 2 + (r.finish_reason == "stop")
        for r in results
        if r.closed and r.completion_tokens is not None and r.completion.startswith(THINK_OPEN)
    ]
    return {
        "items": n,
        "em": sum(r.correct for r in results) / n,
        "em_by_tier": {str(t): sum(r.correct for r in rs) / len(rs) for t, rs in by_tier.items()},
        "items_by_tier": {str(t): len(rs) for t, rs in by_tier.items()},
        "unclosed_thinking": sum(not r.closed for r in results),
        "thinking": {
            "mean": full_mean,
            "median_by_tier": medians,
            "hardest_over_easiest": hardest / easiest if easiest else None,
        },
        "overthinking": {
            "mean_of_items": (
                statistics.fmean(r.after_answer / r.thinking_tokens for r in thinkers) if thinkers else 0.0
            ),
            "token_weighted": sum(r.after_answer for r in results) / total_thinking if total_thinking else 0.0,
            "answer_never_in_thinking": sum(r.answer_at is None for r in results),
        },
        "corrected_slip_share": sum(r.slip for r in results) / n,
        "forced_before_check": {
            "items": len(checked),
            "em": sum(bool(r.before_check_correct) for r in checked) / len(checked) if checked else None,
            "thinking_tokens_saved": (
                sum(r.thinking_tokens - (r.check_at or 0) for r in checked) / total_thinking if total_thinking else 0.0
            ),
        },
        "usage_matches_char_count": f"{sum(tokens_match)}/{len(tokens_match)}",
        "budgets": rows,
    }


def markdown(summary: dict[str, Any]) -> str:
    t = summary["thinking"]
    o = summary["overthinking"]
    medians = ", ".join(f"tier {k}: {v:g}" for k, v in t["median_by_tier"].items())
    ems = ", ".join(f"tier {k}: {v:.3f}" for k, v in summary["em_by_tier"].items())
    ratio = t["hardest_over_easiest"]
    fc = summary["forced_before_check"]
    fc_em = "n/a" if fc["em"] is None else f"{fc['em']:.3f}"
    lines = [
        "| measure | value |",
        "| --- | --- |",
        f"| items | {summary['items']} ({', '.join(f'tier {k}: {v}' for k, v in summary['items_by_tier'].items())}) |",
        f"| EM, no budget | {summary['em']:.3f} ({ems}) |",
        f"| thinking never closed | {summary['unclosed_thinking']} |",
        f"| mean thinking tokens | {t['mean']:.1f} |",
        f"| median thinking tokens | {medians} |",
        f"| hardest / easiest median | {ratio:.2f} |" if ratio is not None else "| hardest / easiest | n/a |",
        f"| thinking after the answer first appears, mean of items | {o['mean_of_items']:.3f} |",
        f"| thinking after the answer first appears, token-weighted | {o['token_weighted']:.3f} |",
        f"| items with a corrected wrong intermediate (` wait `) | {summary['corrected_slip_share']:.3f} |",
        f"| EM forced just before `check` ({fc['items']} items) | {fc_em} |",
        f"| thinking tokens saved by that cut, all items | {fc['thinking_tokens_saved']:.3f} |",
        f"| usage tokens == characters (closed items) | {summary['usage_matches_char_count']} |",
        "",
        "| budget B | EM | mean thinking tokens | share of full thinking | items forced |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in summary["budgets"]:
        lines.append(
            f"| {row['budget']} | {row['em']:.3f} | {row['mean_thinking_tokens']:.1f} "
            f"| {row['token_share']:.3f} | {row['forced']} |"
        )
    lines.append(f"| none | {summary['em']:.3f} | {t['mean']:.1f} | 1.000 | 0 |")
    return "\n".join(lines)


# --- I/O: items and the server --------------------------------------------------


def reference_items(path: Path, limit: int | None) -> list[Item]:
    items = []
    for ref in load_reference_file(path):
        if ref.prompt is None:
            raise SystemExit(f"{path}: item {ref.id!r} uses messages; this script needs prompt items")
        items.append(Item(ref.id, ref.prompt, ref.answers, ref.difficulty))
    return items[:limit]


def fresh_items(seeds: Sequence[int], count: int, references: Path) -> list[Item]:
    """``count`` problems per seed, none of them a reference prompt or drawn twice."""
    taken: set[str] = set()
    for path in sorted(references.glob("*.jsonl")):
        taken.update(ref.prompt for ref in load_reference_file(path) if ref.prompt is not None)
    items = []
    for seed in seeds:
        for i, p in enumerate(generate(seed, count, exclude=taken)):
            taken.add(p.prompt)
            items.append(Item(f"fresh-{seed}-{i:04d}", p.prompt, (str(p.answer),), p.difficulty))
    return items


class Completions:
    """POST /v1/completions with greedy decoding, at most ``concurrency`` at a time."""

    def __init__(self, client: httpx.AsyncClient, model: str, concurrency: int) -> None:
        self._client = client
        self._model = model
        self._slots = asyncio.Semaphore(concurrency)
        self.requests = 0

    async def __call__(self, prompt: str, max_tokens: int) -> tuple[str, str | None, int | None]:
        body = {"model": self._model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
        async with self._slots:
            try:
                response = await self._client.post("/v1/completions", json=body)
            except httpx.HTTPError as exc:
                raise EvaluationError(f"request failed: {exc!r}") from exc
            self.requests += 1
        if response.status_code != 200:
            raise EvaluationError(f"server answered {response.status_code}: {response.text[:500]}")
        data = response.json()
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        return choice["text"], choice.get("finish_reason"), usage.get("completion_tokens")


async def run(
    args: argparse.Namespace, items: list[Item], transport: httpx.AsyncBaseTransport | None = None
) -> list[Result]:
    """Greedy completions for every item, then the forced answers at every budget."""
    timeout = httpx.Timeout(connect=5.0, read=args.timeout, write=10.0, pool=args.timeout)
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    base = args.url.rstrip("/").removesuffix("/v1")
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits, transport=transport) as client:
        complete = Completions(client, args.model, args.concurrency)
        started = time.monotonic()

        async def greedy(item: Item) -> Result:
            text, finish, tokens = await complete(item.prompt, args.max_tokens)
            return make_result(item, text, finish, tokens)

        results = list(await asyncio.gather(*(greedy(item) for item in items)))
        print(f"greedy: {len(results)} items in {time.monotonic() - started:.0f} s", file=sys.stderr)

        async def forced(item: Item, result: Result, budget: int) -> None:
            if budget >= result.thinking_tokens:
                result.budget_correct[budget] = result.correct
                return
            text, _, _ = await complete(forced_prompt(item, result, budget), args.forced_tokens)
            result.budget_correct[budget] = score("####" + text, item.answers)

        async def before_check(item: Item, result: Result) -> None:
            if result.check_at is None:
                return
            text, _, _ = await complete(forced_prompt(item, result, result.check_at), args.forced_tokens)
            result.before_check_correct = score("####" + text, item.answers)

        jobs = [forced(i, r, b) for i, r in zip(items, results, strict=True) for b in args.budgets]
        jobs += [before_check(i, r) for i, r in zip(items, results, strict=True)]
        await asyncio.gather(*jobs)
        elapsed = time.monotonic() - started
        print(f"done: {complete.requests} requests in {elapsed:.0f} s", file=sys.stderr)
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8123", help="server base URL")
    ap.add_argument("--model", default="tinyreason", help="served model name")
    ap.add_argument("--references", type=Path, default=Path("references/arith-test.jsonl"))
    ap.add_argument(
        "--fresh-seed",
        type=int,
        action="append",
        default=[],
        metavar="S",
        help="generate items from this seed instead of reading --references (repeatable)",
    )
    ap.add_argument("--fresh-count", type=int, default=150, metavar="N", help="items per fresh seed")
    ap.add_argument(
        "--exclude",
        type=Path,
        default=Path("references"),
        help="folder of reference sets whose prompts fresh items avoid",
    )
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N reference items")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument(
        "--budgets",
        type=lambda s: [int(b) for b in s.split(",")],
        default=list(DEFAULT_BUDGETS),
        help="comma-separated thinking budgets",
    )
    ap.add_argument("--max-tokens", type=int, default=400, help="greedy completion limit")
    ap.add_argument("--forced-tokens", type=int, default=8, help="forced answer limit")
    ap.add_argument("--timeout", type=float, default=120.0, help="read timeout per request, seconds")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = ap.parse_args(argv)
    if args.concurrency < 1:
        ap.error("--concurrency must be at least 1")
    if any(b < 0 for b in args.budgets):
        ap.error("--budgets must not be negative")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.fresh_seed:
        items = fresh_items(args.fresh_seed, args.fresh_count, args.exclude)
        source: dict[str, Any] = {"fresh_seeds": args.fresh_seed, "per_seed": args.fresh_count}
    else:
        items = reference_items(args.references, args.limit)
        source = {"references": str(args.references), "limit": args.limit}
    if not items:
        raise SystemExit("no items to evaluate")
    try:
        results = asyncio.run(run(args, items))
    except EvaluationError as exc:
        raise SystemExit(f"evaluate.py: {exc}") from exc
    summary = summarize(results, args.budgets)
    print(markdown(summary))
    if args.out is not None:
        report = {
            "command": " ".join(["models/evaluate.py", *(argv if argv is not None else sys.argv[1:])]),
            "model": args.model,
            "url": args.url,
            "source": source,
            "decoding": {"temperature": 0.0, "max_tokens": args.max_tokens, "forced_tokens": args.forced_tokens},
            **summary,
            "per_item": [
                {**asdict(r), "budget_correct": {str(b): ok for b, ok in r.budget_correct.items()}} for r in results
            ],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
