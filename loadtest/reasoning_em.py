"""Forced-answer EM on a reasoning-parser deployment against the bare-text path, at the same budgets.

One vLLM engine started with ``--reasoning-parser`` serves both shapes: its
``/v1/completions`` is untouched by the parser (the thinking stays in the
text: the bare path), while its chat splits the thinking into ``reasoning``.
The bundled model's chat template renders the same prompt as completions, so
the two paths differ only in how the gateway sees the thinking and continues
it. Every item runs with ``{"policy": "budget", "budget": B}``, greedy::

    python -m loadtest.reasoning_em --url http://127.0.0.1:8000 --budgets 64 96
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from gateway.evaluation import exact_match, get_extractor, get_normalizer, load_reference_file

SHAPES = ("bare", "parser")


@dataclass(frozen=True)
class Outcome:
    correct: bool
    stopped: bool  # the budget cut the reasoning (else the greedy answer stands)
    thinking: int
    tokens_add_up: bool  # usage.completion_tokens == thinking + answer + forced
    reasoning_in_field: bool  # chat: the reasoning came in a reasoning field, never in content


async def one(
    client: httpx.AsyncClient,
    shape: str,
    prompt: str,
    golds: tuple[str, ...],
    budget: int,
    *,
    chat_template: str | None = None,
) -> Outcome:
    body: dict[str, Any] = {"model": "tinyreason", "temperature": 0, "stopgate": {"policy": "budget", "budget": budget}}
    if chat_template is not None and shape != "bare":
        body["chat_template"] = chat_template
    if shape == "bare":
        body["prompt"] = prompt
        r = await client.post("/v1/completions", json=body)
    else:
        body["messages"] = [{"role": "user", "content": prompt.rstrip("\n")}]
        r = await client.post("/v1/chat/completions", json=body)
    r.raise_for_status()
    data = r.json()
    choice = data["choices"][0]
    text = choice["text"] if shape == "bare" else choice["message"]["content"] or ""
    ext, usage = data["stopgate"], data["usage"]
    tokens = ext["tokens"]
    in_field = shape == "bare" or (
        "<think>" not in text and "</think>" not in text and bool(choice["message"].get("reasoning"))
    )
    return Outcome(
        correct=bool(exact_match(text, golds, extractor=get_extractor("gsm8k"), normalizer=get_normalizer("number"))),
        stopped=ext["stop_reason"] == "budget",
        thinking=int(tokens["thinking"]),
        tokens_add_up=usage["completion_tokens"] == tokens["thinking"] + tokens["answer"] + tokens["forced"],
        reasoning_in_field=in_field,
    )


async def measure(
    url: str,
    references: Path,
    budgets: list[int],
    *,
    limit: int | None = None,
    concurrency: int = 8,
    chat_template: str | None = None,
    shapes: tuple[str, ...] = SHAPES,
) -> dict[str, Any]:
    """EM, stops and mean thinking per (shape, budget); the items are the first ``limit`` of the file.

    ``chat_template``: the chat requests bring this template (the engine needs --trust-request-chat-template).
    """
    items = list(load_reference_file(references))[:limit]
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=180) as client:

        async def run(shape: str, prompt: str, golds: tuple[str, ...], budget: int) -> Outcome:
            async with gate:
                return await one(client, shape, prompt, golds, budget, chat_template=chat_template)

        out: dict[str, Any] = {"items": len(items), "results": []}
        for budget in budgets:
            for shape in shapes:
                outcomes = await asyncio.gather(
                    *(run(shape, it.prompt or "", tuple(it.answers), budget) for it in items)
                )
                n = len(outcomes)
                out["results"].append(
                    {
                        "shape": shape,
                        "budget": budget,
                        "em": sum(o.correct for o in outcomes) / n,
                        "stopped": sum(o.stopped for o in outcomes),
                        "mean_thinking": sum(o.thinking for o in outcomes) / n,
                        "tokens_add_up": sum(o.tokens_add_up for o in outcomes),
                        "reasoning_in_field": sum(o.reasoning_in_field for o in outcomes),
                        "correct": [o.correct for o in outcomes],
                    }
                )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--url", required=True, help="the gateway, in front of vLLM with --reasoning-parser")
    ap.add_argument("--references", type=Path, default=Path("references/arith-dev.jsonl"))
    ap.add_argument("--budgets", type=int, nargs="+", default=[64, 96])
    ap.add_argument("--limit", type=int)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--chat-template", type=Path, help="a template file the chat requests bring with them")
    ap.add_argument("--out", type=Path, help="write the full result (per item included) as JSON")
    args = ap.parse_args(argv)
    result = asyncio.run(
        measure(
            args.url,
            args.references,
            args.budgets,
            limit=args.limit,
            concurrency=args.concurrency,
            chat_template=args.chat_template.read_text() if args.chat_template else None,
        )
    )
    for row in result["results"]:
        print(
            f"{row['shape']:>6} B={row['budget']:<4} EM={row['em']:.3f} stopped={row['stopped']}/{result['items']} "
            f"mean_thinking={row['mean_thinking']:.1f} tokens_add_up={row['tokens_add_up']} "
            f"reasoning_in_field={row['reasoning_in_field']}"
        )
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
