"""Cue mining: find a route's stop cues in its own full-length reasoning, without a person.

    stopgate tune arith --mine-cues                    # mine on the train split, validate on dev
    python -m loadtest.cues arith --references references/arith-train.jsonl \\
        --validate references/arith-dev.jsonl --limit 300 --validate-limit 200

1. **Generate.** Every mining item runs once through the gateway at full length
   (greedy, policy ``none``); the texts are kept in ``OUT/traces-mine.jsonl``.
2. **Mine (offline).** In each correct trace, the *gold point* is where the
   gold answer first appears in the reasoning (the oracle's stop). Candidate
   cues are the digit-free substrings that start within ``--window``
   characters after it. Each candidate is scored on all traces as if it were
   a stop string: the engine stops at its first occurrence; a stop before the
   gold point is counted wrong, a stop after it right (as right as the full
   trace), no occurrence costs the full trace. A candidate that ever shows up
   in an answer (after the think-close) is dropped: as an engine stop string
   it would cut the answer. The ranking is by the saving among candidates
   whose estimated EM is within ``--em-tolerance`` of the traces'; among
   those within ``--slack`` of the best saving, the fewest early stops and
   then the longest (most specific) cue wins. Cues that add saving are then
   added greedily to a set (``--max-cues``).
3. **Validate (through the gateway).** The best ``--validate-top`` cue sets
   and no stopping run on a held-out split the miner never saw; the winner is
   the one with the largest measured saving whose EM is within
   ``--em-tolerance`` of no stopping there.
4. **Write** ``OUT/cues.yaml``, a routes snippet with the ``cue`` policy, and
   ``OUT/cues.json`` with every number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from gateway.engine.embedded import free_port
from gateway.evaluation import exact_match, get_extractor, get_normalizer
from gateway.settings import DEFAULT_ROUTES, ConfigError, RouteConfig, load_routes
from loadtest.common import EMBEDDED_ENV, REPO, Prompt, UsageError, check_loopback, embedded_gateway, load_prompts
from policies.cue import MAX_CUE_CHARS, MAX_CUES


@dataclass(frozen=True)
class Trace:
    """One full-length generation: the reasoning, the answer after it, its tokens and whether it was right."""

    ident: str
    thinking: str  # everything before the think-close delimiter
    answer: str  # everything after it
    thinking_tokens: int
    net: int
    correct: bool
    gold_end: int | None  # offset in ``thinking`` where the gold answer first ends (None: never written)


@dataclass(frozen=True)
class Score:
    """A cue set scored offline on traces as if it were the engine's stop strings."""

    cues: tuple[str, ...]
    em: float
    net_mean: float
    saving: float  # 1 - net / the traces' net
    early: int  # stops before the gold point (counted wrong)
    stopped: int  # traces the cues stop at all


def gold_end(thinking: str, answers: Sequence[str]) -> int | None:
    """Where a gold answer first ends in ``thinking``, as a whole number (the oracle of loadtest/compare.py)."""
    ends = [m.end() for a in answers if (m := re.search(rf"(?<!\d){re.escape(a)}(?!\d)", thinking))]
    return min(ends) if ends else None


def make_trace(
    ident: str, text: str, answers: Sequence[str], close: str, thinking_tokens: int, net: int, correct: bool
) -> Trace:
    at = text.find(close)
    thinking, answer = (text, "") if at < 0 else (text[:at], text[at + len(close) :])
    return Trace(ident, thinking, answer, thinking_tokens, net, correct, gold_end(thinking, answers))


def candidates(traces: Sequence[Trace], window: int = 32, max_len: int = 24) -> list[str]:
    """Digit-free, not-all-space substrings starting within ``window`` characters after a correct trace's gold point.

    Digits are left out because they belong to the item (operands, sums), not to the model's habit.
    """
    found: set[str] = set()
    max_len = min(max_len, MAX_CUE_CHARS)
    for t in traces:
        if not t.correct or t.gold_end is None:
            continue
        for start in range(t.gold_end, min(t.gold_end + window, len(t.thinking))):
            for length in range(1, max_len + 1):
                piece = t.thinking[start : start + length]
                if len(piece) < length or any(c.isdigit() for c in piece):
                    break
                if piece.strip():
                    found.add(piece)
    return sorted(found)


def score(cues: Sequence[str], traces: Sequence[Trace]) -> Score:
    """EM and net tokens if ``cues`` were stop strings on these traces (a stop costs the answer's tokens again)."""
    hits = early = stopped = 0
    net = full = 0.0
    for t in traces:
        full += t.net
        ats = [i + len(c) for c in cues if (i := t.thinking.find(c)) >= 0]
        if not ats:
            hits += t.correct
            net += t.net
            continue
        end = min(ats)
        stopped += 1
        right = t.gold_end is not None and end >= t.gold_end
        early += not right
        hits += t.correct and right
        per_char = t.thinking_tokens / max(1, len(t.thinking))
        net += min(t.net, round(end * per_char) + max(1, t.net - t.thinking_tokens))
    n = max(1, len(traces))
    return Score(tuple(cues), hits / n, net / n, 1 - net / full if full else 0.0, early, stopped)


def rank(
    traces: Sequence[Trace], *, window: int = 32, max_len: int = 24, em_tolerance: float = 0.01, slack: float = 0.01
) -> list[Score]:
    """Single cues that keep the estimated EM within ``em_tolerance`` of the traces', best first."""
    base = sum(t.correct for t in traces) / max(1, len(traces))
    in_answers = [t.answer for t in traces]
    scores = [
        score((c,), traces)
        for c in candidates(traces, window, max_len)
        if not any(c in a for a in in_answers)  # as an engine stop string it would cut an answer
    ]
    feasible = [s for s in scores if s.stopped and s.em >= base - em_tolerance - 1e-9]
    if not feasible:
        return []
    best = max(s.saving for s in feasible)
    near = [s for s in feasible if s.saving >= best - slack]
    near.sort(key=lambda s: (s.early, -len(s.cues[0]), -s.saving))
    rest = sorted((s for s in feasible if s not in near), key=lambda s: (-s.saving, s.early, -len(s.cues[0])))
    return near + rest


def grow(
    first: Score,
    ranked: Sequence[Score],
    traces: Sequence[Trace],
    *,
    max_cues: int = 4,
    em_tolerance: float = 0.01,
    min_gain: float = 0.005,
) -> Score:
    """Add cues from ``ranked`` to ``first`` while each adds ``min_gain`` saving and EM stays within tolerance."""
    base = sum(t.correct for t in traces) / max(1, len(traces))
    current = first
    for s in ranked:
        if len(current.cues) >= min(max_cues, MAX_CUES):
            break
        cue = s.cues[0]
        if any(cue in c or c in cue for c in current.cues):
            continue
        trial = score((*current.cues, cue), traces)
        if trial.saving >= current.saving + min_gain and trial.em >= base - em_tolerance - 1e-9:
            current = trial
    return current


def mine(traces: Sequence[Trace], *, top: int = 3, max_cues: int = 4, **options: Any) -> list[Score]:
    """The ``top`` cue sets to validate: the grown best set, then the next best single cues."""
    ranked = rank(traces, **options)
    if not ranked:
        return []
    tolerance = options.get("em_tolerance", 0.01)
    out = [grow(ranked[0], ranked[1:], traces, max_cues=max_cues, em_tolerance=tolerance)]
    for s in ranked:
        if len(out) >= top:
            break
        if s.cues not in {o.cues for o in out}:
            out.append(s)
    return out


# -- generation and validation through the gateway ---------------------------------


async def run_items(
    url: str,
    route: RouteConfig,
    prompts: Sequence[Prompt],
    stopgate: dict[str, Any],
    *,
    concurrency: int = 16,
    timeout_s: float = 300.0,
) -> list[tuple[Prompt, str, dict[str, Any], bool]]:
    """Each prompt once through the gateway's completions endpoint, greedy: (prompt, text, tokens, correct)."""
    extract, normalize = get_extractor(route.extractor, route.extractor_pattern), get_normalizer(route.normalizer)
    gate = asyncio.Semaphore(concurrency)
    out: list[tuple[Prompt, str, dict[str, Any], bool]] = []
    timeout = httpx.Timeout(connect=5.0, read=timeout_s, write=10.0, pool=timeout_s)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=concurrency * 2)) as client:

        async def one(p: Prompt) -> None:
            body = {"model": route.name, "prompt": p.prompt, "temperature": 0.0, "stopgate": stopgate}
            tries = 0
            while True:  # a transient engine error (a 5xx) is retried, twice
                tries += 1
                async with gate:
                    r = await client.post(f"{url}/v1/completions", json=body)
                if r.status_code < 500 or tries == 3:
                    break
            if r.status_code != 200:
                raise UsageError(f"{p.ident}: HTTP {r.status_code} after {tries} tries: {r.text[:200]}")
            data = r.json()
            text = data["choices"][0]["text"] or ""
            correct = bool(exact_match(text, list(p.answers), extractor=extract, normalizer=normalize))
            out.append((p, text, data["stopgate"]["tokens"], correct))

        await asyncio.gather(*(one(p) for p in prompts))
    order = {p.ident: i for i, p in enumerate(prompts)}
    return sorted(out, key=lambda row: order[row[0].ident])


async def collect(url: str, route: RouteConfig, prompts: Sequence[Prompt], **kw: Any) -> list[Trace]:
    rows = await run_items(url, route, prompts, {"policy": "none"}, **kw)
    return [
        make_trace(p.ident, text, p.answers, route.think_close, tok["thinking"], tok["net"], ok)
        for p, text, tok, ok in rows
    ]


def measured(rows: Sequence[tuple[Prompt, str, dict[str, Any], bool]]) -> dict[str, float]:
    n = max(1, len(rows))
    return {"em": sum(r[3] for r in rows) / n, "net_mean": sum(r[2]["net"] for r in rows) / n, "items": len(rows)}


async def validate(
    url: str, route: RouteConfig, prompts: Sequence[Prompt], picks: Sequence[Score], em_tolerance: float, **kw: Any
) -> tuple[dict[str, Any], list[dict[str, Any]], int | None]:
    """No stopping and each pick on the held-out items; the index of the winner (None if none qualifies)."""
    base = measured(await run_items(url, route, prompts, {"policy": "none"}, **kw))
    rows = []
    for s in picks:
        m = measured(await run_items(url, route, prompts, {"policy": "cue", "params": {"cues": list(s.cues)}}, **kw))
        m["saving"] = 1 - m["net_mean"] / base["net_mean"] if base["net_mean"] else 0.0
        m["cues"] = list(s.cues)
        rows.append(m)
        print(f"  validate {s.cues!r}: EM {m['em']:.3f} (none {base['em']:.3f}), saving {m['saving']:.1%}")
    ok = [i for i, m in enumerate(rows) if m["em"] >= base["em"] - em_tolerance - 1e-9]
    winner = max(ok, key=lambda i: rows[i]["saving"], default=None)
    return base, rows, winner


class _Dumper(yaml.SafeDumper):
    """Strings with line breaks or edge spaces in double quotes ("\\ncheck\\n"), as a person would write them."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    quoted = any(c in value for c in "\n\t\r") or value != value.strip()
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"' if quoted else None)


_Dumper.add_representer(str, _str)


def snippet(route: RouteConfig, cues: Sequence[str], note: str) -> str:
    body = {"routes": {route.name: {"policy": {"name": "cue", "params": {"cues": list(cues)}}}}}
    return note + yaml.dump(body, Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def read_traces(path: Path, idents: Sequence[str]) -> list[Trace] | None:
    """Stored traces for exactly these items, else None."""
    try:
        rows = [Trace(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError, TypeError):
        return None
    return rows if [t.ident for t in rows] == list(idents) else None


# -- the command line -----------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="stopgate tune ROUTE --mine-cues",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("route")
    ap.add_argument("--routes", type=Path, default=DEFAULT_ROUTES)
    ap.add_argument("--references", type=Path, help="mining items (default references/ROUTE-train.jsonl)")
    ap.add_argument("--validate", type=Path, help="held-out items (default references/ROUTE-dev.jsonl)")
    ap.add_argument("--limit", type=int, default=300, help="mining items (default 300)")
    ap.add_argument("--validate-limit", type=int, default=200, help="held-out items (default 200)")
    ap.add_argument("--validate-top", type=int, default=3, help="cue sets validated through the gateway (default 3)")
    ap.add_argument("--window", type=int, default=32, help="characters after the gold point cues may start in")
    ap.add_argument("--max-len", type=int, default=24, help="longest cue in characters")
    ap.add_argument("--max-cues", type=int, default=4, help="cues in a set")
    ap.add_argument("--em-tolerance", type=float, default=0.01, help="EM a cue may lose against no stopping")
    ap.add_argument("--slack", type=float, default=0.01, help="saving given up for a more specific cue")
    ap.add_argument("--gateway", help="URL of a running gateway (default: start the embedded stack)")
    ap.add_argument("--allow-remote", action="store_true")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--out", type=Path, help="results directory (default results/tune/ROUTE)")
    return ap


def _check(args: argparse.Namespace) -> tuple[RouteConfig, list[Prompt], list[Prompt]]:
    try:
        route = next((r for r in load_routes(args.routes).routes if r.name == args.route), None)
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc
    if route is None:
        raise UsageError(f"no route {args.route!r} in {args.routes}")
    bounds = {
        "--limit": (args.limit, 10, 100_000),
        "--validate-limit": (args.validate_limit, 1, 100_000),
        "--validate-top": (args.validate_top, 1, 10),
        "--window": (args.window, 1, 1000),
        "--max-len": (args.max_len, 1, MAX_CUE_CHARS),
        "--max-cues": (args.max_cues, 1, MAX_CUES),
        "--concurrency": (args.concurrency, 1, 256),
    }
    for name, (value, low, high) in bounds.items():
        if not low <= value <= high:
            raise UsageError(f"{name} must be in {low}..{high}, got {value}")
    if not 0 <= args.em_tolerance < 1 or not 0 <= args.slack < 1:
        raise UsageError("--em-tolerance and --slack must be in [0, 1)")
    mine_file = args.references or REPO / "references" / f"{route.name}-train.jsonl"
    held_file = args.validate or REPO / "references" / f"{route.name}-dev.jsonl"
    mining = load_prompts([("references", mine_file)])[: args.limit]
    held = load_prompts([("references", held_file)])[: args.validate_limit]
    if {p.prompt for p in mining} & {p.prompt for p in held}:
        raise UsageError(f"{mine_file} and {held_file} share prompts: validation must be on held-out items")
    if args.gateway and not args.allow_remote:
        check_loopback(args.gateway, "--gateway")
    return route, mining, held


async def _session(
    url: str, args: argparse.Namespace, route: RouteConfig, mining: list[Prompt], held: list[Prompt], out: Path
) -> int:
    kw = {"concurrency": args.concurrency}
    store = out / "traces-mine.jsonl"
    traces = read_traces(store, [p.ident for p in mining])
    if traces is None:
        started = time.monotonic()
        traces = await collect(url, route, mining, **kw)
        store.write_text("".join(json.dumps(asdict(t)) + "\n" for t in traces))
        print(f"cues: {len(traces)} full-length traces in {time.monotonic() - started:.1f} s -> {store}")
    options = {"window": args.window, "max_len": args.max_len, "em_tolerance": args.em_tolerance, "slack": args.slack}
    picks = mine(traces, top=args.validate_top, max_cues=args.max_cues, **options)
    base = score((), traces)
    print(f"cues: mining items: EM {base.em:.3f}, {base.net_mean:.1f} net tokens at full length")
    for s in picks:
        print(f"  candidate {s.cues!r}: est. EM {s.em:.3f}, saving {s.saving:.1%}, early stops {s.early}")
    doc: dict[str, Any] = {
        "route": route.name,
        "mining": {"items": len(traces), "em": base.em, "picks": [asdict(s) for s in picks]},
    }
    (out / "cues.yaml").unlink(missing_ok=True)
    if not picks:
        (out / "cues.json").write_text(json.dumps(doc, indent=2) + "\n")
        print("cues: no candidate keeps EM within the tolerance on the mining items", file=sys.stderr)
        return 1
    none, rows, winner = await validate(url, route, held, picks, args.em_tolerance, **kw)
    doc["validation"] = {"none": none, "picks": rows, "winner": winner}
    (out / "cues.json").write_text(json.dumps(doc, indent=2) + "\n")
    if winner is None:
        print("cues: no mined cue kept EM within the tolerance on the held-out items", file=sys.stderr)
        return 1
    w = rows[winner]
    note = (
        f"# stopgate tune {route.name} --mine-cues, {time.strftime('%Y-%m-%d')}: mined on {len(traces)} items,\n"
        f"# validated on {w['items']} held-out items: EM {w['em']:.3f} (no stopping {none['em']:.3f}),\n"
        f"# {w['net_mean']:.1f} net tokens per item ({w['saving']:.1%} fewer). Merge into the routes file.\n"
    )
    (out / "cues.yaml").write_text(snippet(route, w["cues"], note))
    print(f"cues: winner {w['cues']!r}; wrote {out / 'cues.yaml'} and {out / 'cues.json'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        route, mining, held = _check(args)
    except UsageError as exc:
        print(f"cues: error: {exc}", file=sys.stderr)
        return 2
    out = args.out or REPO / "results" / "tune" / route.name
    out.mkdir(parents=True, exist_ok=True)
    print(f"cues: route {route.name}: mining {len(mining)} items, validating on {len(held)} held-out items")
    try:
        if args.gateway:
            return asyncio.run(_session(args.gateway.rstrip("/").removesuffix("/v1"), args, route, mining, held, out))
        extra = ["--routes", str(args.routes)]
        with embedded_gateway(free_port(), out / "logs", *extra, env=EMBEDDED_ENV) as url:
            return asyncio.run(_session(url, args, route, mining, held, out))
    except UsageError as exc:
        print(f"cues: error: {exc}", file=sys.stderr)
        return 1
    except (RuntimeError, httpx.HTTPError) as exc:
        print(f"cues: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
