"""Draw the Grafana dashboard's panels from a Prometheus, without Grafana: one subplot per panel.

    .venv/bin/python docker/render_dashboard.py --prometheus http://127.0.0.1:9090 \\
        --start 1700000000 --end 1700000600 --out docker/dashboard.png

It reads docker/grafana/dashboards/stopgate.json, runs each panel's queries over the time range
(``/api/v1/query_range``) with Grafana's variables replaced (``$route`` by ``.*``, ``$__rate_interval`` by
``--rate-interval``), and writes a PNG with the panels in the dashboard's rows. It is how docker/dashboard.png
was made; Grafana draws the real thing.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DASHBOARD = Path(__file__).resolve().parent / "grafana" / "dashboards" / "stopgate.json"
# Grafana units -> (factor, axis label).
UNITS = {"percentunit": (100.0, "%"), "percent": (1.0, "%"), "s": (1.0, "seconds"), "reqps": (1.0, "req/s")}


def substitute(expr: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables[m.group(1) or m.group(2)], expr)


def legend(fmt: str, labels: dict[str, str]) -> str:
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)
    return text.strip() or ",".join(f"{k}={v}" for k, v in labels.items()) or "value"


def query_range(client: httpx.Client, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    r = client.get("/api/v1/query_range", params={"query": expr, "start": start, "end": end, "step": step})
    body = r.json()
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body.get('error')}")
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def dashboard_rows(dashboard: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """The panels grouped by the row above them, in the dashboard's order."""
    rows: list[tuple[str, list[dict[str, Any]]]] = []
    for panel in sorted(dashboard["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"])):
        if panel["type"] == "row":
            rows.append((panel["title"], list(panel.get("panels", []))))
        else:
            if not rows:
                rows.append(("", []))
            rows[-1][1].append(panel)
    return [(title, panels) for title, panels in rows if panels]


def render(
    prometheus: str, out: Path, start: float, end: float, *, rate_interval: str, dashboard_file: Path = DASHBOARD
) -> None:
    dashboard = json.loads(dashboard_file.read_text())
    variables = {"route": ".*", "__rate_interval": rate_interval}
    rows = dashboard_rows(dashboard)
    columns = max(len(panels) for _, panels in rows)
    step = max(1.0, (end - start) / 300)
    fig, axes = plt.subplots(len(rows), columns, figsize=(5.2 * columns, 3.6 * len(rows)), squeeze=False)
    with httpx.Client(base_url=prometheus, timeout=30) as client:
        for r, (row_title, panels) in enumerate(rows):
            for c in range(columns):
                ax = axes[r][c]
                if c >= len(panels):
                    ax.axis("off")
                    continue
                panel = panels[c]
                unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
                factor, label = UNITS.get(unit, (1.0, ""))
                for target in panel["targets"]:
                    for series in query_range(client, substitute(target["expr"], variables), start, end, step):
                        xs, ys = [], []
                        for t, v in series["values"]:
                            value = float(v)
                            xs.append((float(t) - start) / 60)
                            ys.append(value * factor if math.isfinite(value) else math.nan)
                        ax.plot(xs, ys, linewidth=1.2, label=legend(target.get("legendFormat", ""), series["metric"]))
                prefix = f"{row_title}: " if c == 0 and row_title else ""
                ax.set_title(prefix + panel["title"], fontsize=9, loc="left")
                ax.set_xlabel("minutes", fontsize=7)
                ax.set_ylabel(label, fontsize=7)
                ax.tick_params(labelsize=7)
                ax.grid(alpha=0.3)
                if ax.lines:
                    ax.legend(fontsize=6, loc="upper left", ncol=2)
    fig.suptitle(
        f"{dashboard['title']} dashboard, drawn from Prometheus ({time.strftime('%Y-%m-%d', time.gmtime(end))})",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prometheus", required=True, help="Prometheus base URL")
    parser.add_argument("--start", type=float, help="unix time (default: --minutes before --end)")
    parser.add_argument("--end", type=float, help="unix time (default: now)")
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--rate-interval", default="1m", help="what $__rate_interval becomes")
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "dashboard.png")
    args = parser.parse_args()
    end = args.end if args.end is not None else time.time()
    start = args.start if args.start is not None else end - args.minutes * 60
    render(args.prometheus, args.out, start, end, rate_interval=args.rate_interval, dashboard_file=args.dashboard)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
