"""The peer benchmark's report: the README table, the text summary with its warnings, and the PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ENGINE = "engine"  # the upstream direct, as loadtest/peer.py names it


def markdown(result: dict[str, Any]) -> str:
    """The README's table: one row per target."""
    s, c = result["summary"], result["config"]["connections"]
    names = list(dict.fromkeys(n for phase in s.values() for n in phase))
    head = (
        f"| target | req/s json @{c} | CPU ms/req json | req/s stream @{c} | CPU ms/req stream | CPU us/chunk stream "
        "| p50 / p99 json @1 (ms) | p50 / p99 stream @1 (ms) | added p50 json / stream @1 (ms) | errors |"
    )
    lines = [head, "|" + " --- |" * head.count(" | ") + " --- |"]
    for n in names:

        def get(phase: str, key: str, n: str = n) -> float:
            return float(s.get(phase, {}).get(n, {}).get(key, float("nan")))

        errors = sum(int(s[p][n]["errors"]) for p in s if n in s[p])
        added = "-" if n == ENGINE else f"{get('json@1', 'added_p50_ms'):.2f} / {get('stream@1', 'added_p50_ms'):.2f}"
        lines.append(
            f"| {n} | {get(f'json@{c}', 'rps'):,.0f} | {get(f'json@{c}', 'cpu_ms_per_request'):.2f} "
            f"| {get(f'stream@{c}', 'rps'):,.0f} | {get(f'stream@{c}', 'cpu_ms_per_request'):.2f} "
            f"| {get(f'stream@{c}', 'cpu_us_per_chunk'):.1f} "
            f"| {get('json@1', 'p50_ms'):.2f} / {get('json@1', 'p99_ms'):.2f} "
            f"| {get('stream@1', 'p50_ms'):.2f} / {get('stream@1', 'p99_ms'):.2f} | {added} | {errors} |"
        )
    return "\n".join(lines)


def report(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [
        f"peer benchmark: {c['rounds']} rounds x {c['seconds']:g} s per phase and target, medians; "
        f"{c['tokens']} tokens per answer, /v1/{c['api']}; {c['cpus']} CPUs; stopgate {c['gateway_code']}",
        markdown(result),
        "",
        "load generator and machine (median cores busy during the runs):",
    ]
    for phase, rows in result["summary"].items():
        parts = [
            f"{n} wrk {r['wrk_cores_busy']:.2f} ({r['wrk_cpu_us_per_request']:.0f} us/req), "
            f"server {r['cores_busy']:.2f}, machine {r['machine_cores_busy']:.2f}"
            for n, r in rows.items()
        ]
        lines.append(f"  {phase}: " + "; ".join(parts))
    for name, r in result["ratios"].items():
        lines.append(
            f"  {name}: CPU per streamed request {r['cpu_vs_engine_stream']:.1f}x the engine's; "
            f"per non-streaming request {r['cpu_vs_engine_json_via_stream']:.1f}x the engine's streamed one"
        )
    for name in [ENGINE, *result["ratios"]]:
        at_one = [result["summary"].get(p, {}).get(name, {}) for p in ("json@1", "stream@1")]
        cpu = " / ".join(f"{row.get('cpu_ms_per_request', float('nan')):.2f}" for row in at_one)
        lines.append(f"  {name}: CPU ms per request at 1 connection (json / stream) {cpu}")
    for phase, rows in result["summary"].items():
        for name, r in rows.items():
            if r["in_flight_share"] > 0.1:
                lines.append(
                    f"  WARNING {name} {phase}: {1 / r['in_flight_share']:.1f} answers per connection and run: CPU per "
                    f"request overstated by up to {100 * r['in_flight_share']:.0f}% (work on requests cut off at the "
                    "end); run longer (--seconds), or read CPU at 1 connection"
                )
    for name, why in result["skipped"].items():
        lines.append(f"  skipped {name}: {why}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, c = result["summary"], result["config"]["connections"]
    names = list(dict.fromkeys(n for phase in s.values() for n in phase))
    panels = [
        (f"req/s at {c} connections", "rps", (f"json@{c}", f"stream@{c}")),
        (f"server CPU ms per request at {c} connections", "cpu_ms_per_request", (f"json@{c}", f"stream@{c}")),
        ("p50 ms at 1 connection", "p50_ms", ("json@1", "stream@1")),
        ("p99 ms at 1 connection", "p99_ms", ("json@1", "stream@1")),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    width = 0.8 / max(1, len(names))
    for ax, (title, key, keys) in zip(axes.flat, panels, strict=True):
        for i, n in enumerate(names):
            values = [float(s.get(p, {}).get(n, {}).get(key, float("nan"))) for p in keys]
            bars = ax.bar([j + i * width for j in range(len(keys))], values, width, label=n)
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(keys))], ["non-streaming", "streaming"])
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(
        f"peer benchmark, one upstream, {result['config']['tokens']} chunks per answer; medians of "
        f"{result['config']['rounds']} interleaved rounds ({result['config']['cpus']} CPUs)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
