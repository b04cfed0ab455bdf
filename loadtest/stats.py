"""Per-request records, the statistics the load generator, tuner and serving benchmark report, and their files.

The statistics are pure (records in, numbers out) and tested on fixed inputs;
the last part writes them out (JSON, CSV, PNG) for ``loadtest.load``. The records themselves are in
``loadtest/load_types.py``.

Definitions (times in seconds, all measured by the client):

- **E2E**: from the request's *scheduled* send time (open loop; the actual send
  time in a closed loop) to the last byte of the response. Counting from the
  schedule keeps a client that falls behind from hiding queueing.
- **TTFT**: from the same start to the first streamed chunk that carries text
  (streaming only).
- **TPOT** (time per output token), per request: ``(E2E - TTFT) / (output
  tokens - 1)``; undefined for non-streaming requests and for answers of one
  token or fewer. Output tokens are ``usage.completion_tokens`` when the
  response reports it, otherwise the number of text-carrying chunks.
- **ITL** (inter-token latency): every gap between consecutive streamed chunks
  that carry text, pooled over all requests. vLLM sends one token per chunk,
  so ITL is per token there; a server that batches tokens into chunks shows
  fewer, longer gaps.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from loadtest.common import percentile, wilson
from loadtest.load_types import LoadConfig, LoadResult, Record, StepResult

QUANTILES = (50, 90, 99)
# The gateway's `stopgate.tokens` kinds, in the order they are reported.
TOKEN_KINDS = ("prompt", "thinking", "answer", "probe_prompt", "probe", "forced_prompt", "forced", "net")
USAGE_KINDS = ("prompt_tokens", "completion_tokens")


def gaps(times: Sequence[float]) -> list[float]:
    """Gaps between consecutive arrival times: the ITL samples of one stream."""
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def quantiles(values: Iterable[float]) -> dict[str, float | None]:
    """p50/p90/p99 and the mean; None (JSON null) where there are no values."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "n": 0}
    out: dict[str, float | None] = {f"p{q}": percentile(vals, q) for q in QUANTILES}
    out["mean"] = sum(vals) / len(vals)
    out["n"] = len(vals)
    return out


def em_summary(hits: float, n: int) -> dict[str, float | int | None]:
    """EM with its Wilson 95% interval; EM is None when nothing was scored."""
    if n == 0:
        return {"scored": 0, "em": None, "low": None, "high": None}
    low, high = wilson(round(hits), n)
    return {"scored": n, "em": hits / n, "low": low, "high": high}


def summarize(records: Sequence[Record], seconds: float) -> dict[str, Any]:
    """The numbers of one target in one step; ``seconds`` is the time the target was offered load.

    Throughput is successful requests (and their output tokens) per offered
    second. Latencies count successful requests only; errors are counted by kind.
    """
    ok = [r for r in records if r.ok]
    errors = Counter(r.error for r in records if not r.ok)
    out_tokens = sum(r.output_tokens or 0 for r in ok)
    scored = [r.correct for r in ok if r.correct is not None]
    out: dict[str, Any] = {
        "requests": len(records),
        "ok": len(ok),
        "errors": dict(sorted(errors.items())),
        "error_rate": (len(records) - len(ok)) / len(records) if records else 0.0,
        "seconds": seconds,
        "throughput_rps": len(ok) / seconds if seconds > 0 else None,
        "output_tokens_per_s": out_tokens / seconds if seconds > 0 else None,
        "e2e_s": quantiles(r.e2e_s for r in ok if r.e2e_s is not None),
        "ttft_s": quantiles(r.ttft_s for r in ok if r.ttft_s is not None),
        "tpot_s": quantiles(t for r in ok if (t := r.tpot_s) is not None),
        "itl_s": quantiles(g for r in ok for g in r.itl_s),
        "lag_s": quantiles(r.lag_s for r in records),
        "em": em_summary(sum(scored), len(scored)),
        "tokens": token_summary(ok),
        "stop_reasons": dict(sorted(Counter(r.stop_reason for r in ok if r.stop_reason).items())),
    }
    return out


def token_summary(records: Sequence[Record]) -> dict[str, Any]:
    """Mean and total tokens per request by kind: the gateway's kinds if every response had them, else usage."""
    kinds: tuple[str, ...]
    if records and all(r.tokens is not None for r in records):
        source, kinds = "stopgate", TOKEN_KINDS
        rows: list[Mapping[str, int]] = [r.tokens or {} for r in records]
    else:
        source, kinds = "usage", USAGE_KINDS
        rows = [r.usage for r in records if r.usage is not None]
    totals = {k: sum(int(row.get(k, 0)) for row in rows) for k in kinds}
    means = {k: totals[k] / len(rows) if rows else None for k in kinds}
    return {"source": source, "responses": len(rows), "mean": means, "total": totals}


# Headline numbers compared between targets: (label, path into a summary).
RATIO_METRICS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("throughput_rps", ("throughput_rps",)),
    ("output_tokens_per_s", ("output_tokens_per_s",)),
    ("e2e_p50", ("e2e_s", "p50")),
    ("e2e_p99", ("e2e_s", "p99")),
    ("ttft_p50", ("ttft_s", "p50")),
    ("ttft_p99", ("ttft_s", "p99")),
    ("tpot_p50", ("tpot_s", "p50")),
    ("itl_p50", ("itl_s", "p50")),
    ("em", ("em", "em")),
    ("error_rate", ("error_rate",)),
)


def dig(summary: Mapping[str, Any], path: Sequence[str]) -> float | None:
    value: Any = summary
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def ratios(base: Mapping[str, Any], other: Mapping[str, Any]) -> dict[str, float | None]:
    """other / base for each headline metric (net tokens too); None where either is missing or base is 0."""
    out: dict[str, float | None] = {}
    metrics = [*RATIO_METRICS, ("net_tokens_mean", ("tokens", "mean", "net"))]
    for label, path in metrics:
        a, b = dig(base, path), dig(other, path)
        out[label] = b / a if a is not None and b is not None and a != 0 else None
    return out


def recommend(points: Sequence[tuple[int, int, float]], target: float, z: float = 1.96) -> int | None:
    """The cheapest point whose EM Wilson lower bound (95% by default) reaches ``target``.

    Each point is ``(correct, items, mean net tokens)``. Ties in cost go to the
    higher EM, then to the earlier point. None when no point qualifies.
    """
    eligible = [i for i, (hits, n, _) in enumerate(points) if n > 0 and wilson(hits, n, z)[0] >= target]
    if not eligible:
        return None
    return min(eligible, key=lambda i: (points[i][2], -points[i][0] / points[i][1], i))


# --- reports: the table printed per step, and the files written at the end --------------------------------


def step_summaries(result: LoadResult) -> list[dict[str, Any]]:
    """Per step: the levels, each target's summary, and every other target's ratios to the first."""
    out = []
    names = [t.name for t in result.config.targets]
    for step in result.steps:
        records = [r for r in result.records if r.step == step.step]
        targets = {n: summarize([r for r in records if r.target == n], step.seconds[n]) for n in names}
        base = names[0]
        out.append(
            {
                "step": step.step,
                "levels": step.levels,
                "wall_s": step.wall_s,
                "targets": targets,
                "ratios": {f"{n}/{base}": ratios(targets[base], targets[n]) for n in names[1:]},
            }
        )
    return out


def _f(value: float | None, spec: str = ".3f", scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def format_table(summary: dict[str, Any], unit: str) -> list[str]:
    """Markdown lines for one step's ``step_summaries`` entry."""
    lines = [
        f"| target | {unit} | ok/sent | errors | req/s | out tok/s | E2E p50/p90/p99 s | TTFT p50/p99 s "
        "| TPOT p50 ms | ITL p50 ms | EM [95% CI] | tokens/req | stop reasons |",
        "| --- " * 13 + "|",
    ]
    for name, s in summary["targets"].items():
        e, t, em, tok = s["e2e_s"], s["ttft_s"], s["em"], s["tokens"]
        em_text = "-" if em["em"] is None else f"{em['em']:.3f} [{em['low']:.2f}, {em['high']:.2f}] n={em['scored']}"
        key = "net" if tok["source"] == "stopgate" else "completion_tokens"
        errors = ", ".join(f"{k} {v}" for k, v in s["errors"].items()) or "0"
        reasons = ", ".join(f"{k} {v}" for k, v in s["stop_reasons"].items()) or "-"
        lines.append(
            f"| {name} | {summary['levels'][name]:g} | {s['ok']}/{s['requests']} | {errors} "
            f"| {_f(s['throughput_rps'], '.2f')} | {_f(s['output_tokens_per_s'], '.1f')} "
            f"| {_f(e['p50'])} / {_f(e['p90'])} / {_f(e['p99'])} | {_f(t['p50'])} / {_f(t['p99'])} "
            f"| {_f(s['tpot_s']['p50'], '.2f', 1e3)} | {_f(s['itl_s']['p50'], '.2f', 1e3)} | {em_text} "
            f"| {_f(tok['mean'][key], '.1f')} {'net' if key == 'net' else 'out'} | {reasons} |"
        )
    for pair, values in summary["ratios"].items():
        shown = ", ".join(f"{k} {v:.3f}x" for k, v in values.items() if v is not None)
        lines.append(f"ratios {pair}: {shown}")
    return lines


def print_step(step: StepResult, records: Sequence[Record], config: LoadConfig) -> None:
    names = [t.name for t in config.targets]
    targets = {n: summarize([r for r in records if r.target == n], step.seconds[n]) for n in names}
    summary = {
        "levels": step.levels,
        "targets": targets,
        "ratios": {f"{n}/{names[0]}": ratios(targets[names[0]], targets[n]) for n in names[1:]},
    }
    unit = "rate /s" if config.mode == "rate" else "concurrency"
    print(f"\nstep {step.step + 1}/{len(config.steps)} ({step.wall_s:.1f} s)")
    print("\n".join(format_table(summary, unit)), flush=True)


CSV_RECORD_FIELDS = (
    "target step seq item start_s lag_s e2e_s ttft_s tpot_s output_tokens chunks itl_mean_s error status "
    "correct stop_reason"
).split()


def write_outputs(result: LoadResult, out: Path, *, plots: bool = True) -> list[Path]:
    """``load.json``, ``requests.csv``, ``summary.csv`` and (unless ``plots`` is off) three PNGs in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    steps = step_summaries(result)
    doc = {
        "complete": result.complete,
        "started": result.started,
        "elapsed_s": result.elapsed_s,
        "config": result.config.describe(),
        "prompts": result.prompts,
        "definitions": __doc__,
        "steps": steps,
    }
    paths = [out / "load.json", out / "requests.csv", out / "summary.csv"]
    paths[0].write_text(json.dumps(doc, indent=2) + "\n")
    with open(paths[1], "w", newline="") as f:
        fields = [*CSV_RECORD_FIELDS, *(f"tokens_{k}" for k in TOKEN_KINDS), *USAGE_KINDS]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in result.records:
            row: dict[str, Any] = {k: getattr(r, k) for k in CSV_RECORD_FIELDS if k != "itl_mean_s"}
            row["itl_mean_s"] = sum(r.itl_s) / len(r.itl_s) if r.itl_s else None
            row |= {f"tokens_{k}": (r.tokens or {}).get(k) for k in TOKEN_KINDS}
            row |= {k: (r.usage or {}).get(k) for k in USAGE_KINDS}
            writer.writerow(row)
    with open(paths[2], "w", newline="") as f:
        table = csv.writer(f)
        lat = [f"{m}_{q}" for m in ("e2e_s", "ttft_s", "tpot_s", "itl_s") for q in ("p50", "p90", "p99")]
        table.writerow(
            ["step", "target", "level", "requests", "ok", "error_rate", "errors", "throughput_rps"]
            + ["output_tokens_per_s", *lat, "em", "em_low", "em_high", "em_scored", "tokens_source"]
            + ["tokens_mean_net", "tokens_mean_completion", "stop_reasons"]
        )
        for st in steps:
            for name, s in st["targets"].items():
                tok = s["tokens"]["mean"]
                table.writerow(
                    [st["step"], name, st["levels"][name], s["requests"], s["ok"], s["error_rate"]]
                    + [json.dumps(s["errors"]), s["throughput_rps"], s["output_tokens_per_s"]]
                    + [s[m][q] for m in ("e2e_s", "ttft_s", "tpot_s", "itl_s") for q in ("p50", "p90", "p99")]
                    + [s["em"]["em"], s["em"]["low"], s["em"]["high"], s["em"]["scored"], s["tokens"]["source"]]
                    + [tok.get("net"), tok.get("completion_tokens"), json.dumps(s["stop_reasons"])]
                )
    if plots:
        paths += plot_all(result, steps, out)
    return paths


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (imported late: it is slow and only plots need it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_all(result: LoadResult, steps: list[dict[str, Any]], out: Path) -> list[Path]:
    plt = pyplot()
    names = [t.name for t in result.config.targets]
    unit = "offered rate (requests/s per target)" if result.config.mode == "rate" else "concurrency per target"
    paths = [out / "latency_cdf.png", out / "throughput.png", out / "em_tokens.png"]

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, attr, title in ((axes[0], "e2e_s", "E2E"), (axes[1], "ttft_s", "TTFT (streaming)")):
        for st in steps:
            for name in names:
                values = sorted(
                    v
                    for r in result.records
                    if r.step == st["step"] and r.target == name and r.ok and (v := getattr(r, attr)) is not None
                )
                if values:
                    ys = [(i + 1) / len(values) for i in range(len(values))]
                    ax.step(values, ys, where="post", label=f"{name} @ {st['levels'][name]:g}")
        ax.set_xlabel(f"{title} seconds")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{title} CDF")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name in names:
        xs = [st["levels"][name] for st in steps]
        ax1.plot(xs, [st["targets"][name]["throughput_rps"] or 0 for st in steps], marker="o", label=name)
        for q, style in (("p50", "-"), ("p99", "--")):
            ys = [st["targets"][name]["e2e_s"][q] for st in steps]
            ax2.plot(xs, [math.nan if y is None else y for y in ys], style, marker="o", label=f"{name} E2E {q}")
    ax1.set_xlabel(unit)
    ax1.set_ylabel("achieved requests/s")
    ax1.set_title("throughput")
    ax2.set_xlabel(unit)
    ax2.set_ylabel("seconds")
    ax2.set_title("E2E latency")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in names:
        pts = []
        for st in steps:
            s = st["targets"][name]
            key = "net" if s["tokens"]["source"] == "stopgate" else "completion_tokens"
            cost = s["tokens"]["mean"].get(key)
            if s["em"]["em"] is not None and cost is not None:
                pts.append((cost, s["em"]["em"], st["levels"][name]))
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=name)
            for x, y, level in pts:
                ax.annotate(f"{level:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if not ax.has_data():
        ax.text(0.5, 0.5, "no EM: no prompt had answers", ha="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=7)
    ax.set_xlabel("mean tokens per request (net if the gateway reports it, else completion)")
    ax.set_ylabel("exact match")
    ax.set_title("EM against tokens (labels: load level)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=110)
    plt.close(fig)
    return paths
