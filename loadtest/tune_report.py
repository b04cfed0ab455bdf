"""The tuner's report: the table, the Pareto frontier, the recommendation and its routes-file snippet, the plot.

``loadtest/tune.py`` runs the sweep and hands each point's summary here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from gateway.settings import RouteConfig
from loadtest.common import pareto_frontier
from loadtest.stats import pyplot, recommend


def report(
    rows: list[dict[str, Any]], route: RouteConfig, target: float, out: Path, sources: list[str]
) -> dict[str, Any]:
    """Print the table of the points' summaries; write tune.json, the frontier plot and (if any point
    qualifies) recommended.yaml."""
    front = pareto_frontier([(s["net_mean"], s["em"]) for s in rows])
    pick = recommend([(s["correct"], s["items"], s["net_mean"]) for s in rows], target)
    print(f"\n| setting | EM [95% CI] | net tokens mean / p50 / p90 | probe share | frontier | low >= {target} |")
    print("| --- | --- | --- | --- | --- | --- |")
    for i, s in enumerate(rows):
        mark = " **recommended**" if i == pick else ""
        print(
            f"| {s['setting']}{mark} | {s['em']:.3f} [{s['em_low']:.3f}, {s['em_high']:.3f}] | "
            f"{s['net_mean']:.1f} / {s['net_p50']:.0f} / {s['net_p90']:.0f} | {s['probe_share']:.1%} | "
            f"{'yes' if i in front else ''} | {'yes' if s['em_low'] >= target else 'no'} |"
        )
    out.mkdir(parents=True, exist_ok=True)
    recommended = rows[pick] if pick is not None else None
    doc = {"route": route.name, "target": target, "references": sources, "points": rows, "frontier": front}
    doc["recommended"] = recommended
    paths = [out / "tune.json", out / "frontier.png"]
    (out / "recommended.yaml").unlink(missing_ok=True)  # never leave an older sweep's advice behind
    if recommended is not None:
        paths.append(out / "recommended.yaml")
        paths[-1].write_text(snippet(route, recommended, target, sources))
        print(
            f"\nrecommended: {recommended['setting']}: EM {recommended['em']:.3f} "
            f"[{recommended['em_low']:.3f}, {recommended['em_high']:.3f}] at {recommended['net_mean']:.1f} "
            f"net tokens per item (target {target} on the Wilson lower bound)"
        )
    else:
        best = max(rows, key=lambda s: s["em_low"])
        print(
            f"\nno setting's EM Wilson lower bound reaches {target} on these {rows[0]['items']} items "
            f"(best: {best['setting']} at {best['em_low']:.3f}); try more items, larger budgets or a lower target"
        )
    paths[0].write_text(json.dumps(doc, indent=2) + "\n")
    plot(rows, front, pick, target, route.name, paths[1])
    print("wrote " + ", ".join(str(p) for p in paths))
    return doc


def snippet(route: RouteConfig, s: dict[str, Any], target: float, sources: list[str]) -> str:
    body = {"routes": {route.name: {"policy": {"name": s["policy"], "params": s["params"]}, "budget": s["budget"]}}}
    head = (
        f"# stopgate tune {route.name}, {time.strftime('%Y-%m-%d')}: the cheapest setting whose EM Wilson 95%\n"
        f"# lower bound reaches {target} on {s['items']} items of {', '.join(sources)}:\n"
        f"# EM {s['em']:.3f} [{s['em_low']:.3f}, {s['em_high']:.3f}], {s['net_mean']:.1f} net tokens per item.\n"
        "# Merge into the routes file. With a `control` block the budget is the controller's loosest one.\n"
    )
    return head + yaml.safe_dump(body, sort_keys=False)


def plot(rows: list[dict[str, Any]], front: list[int], pick: int | None, target: float, name: str, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    xs, ys = [s["net_mean"] for s in rows], [s["em"] for s in rows]
    lows = [s["em"] - s["em_low"] for s in rows]
    highs = [s["em_high"] - s["em"] for s in rows]
    ax.errorbar(xs, ys, yerr=[lows, highs], fmt="o", color="tab:blue", alpha=0.7, label="EM, Wilson 95%")
    for s in rows:
        ax.annotate(s["setting"], (s["net_mean"], s["em"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.plot([xs[i] for i in front], [ys[i] for i in front], color="tab:orange", label="Pareto frontier")
    ax.axhline(target, color="tab:red", linestyle="--", linewidth=1, label=f"target {target} (on the lower bound)")
    if pick is not None:
        ax.scatter([xs[pick]], [ys[pick]], marker="*", s=220, color="tab:green", zorder=3, label="recommended")
    ax.set_xlabel("mean net tokens per item (main + probes + forced answer)")
    ax.set_ylabel("exact match")
    ax.set_title(f"stopgate tune {name}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
