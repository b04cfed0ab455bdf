"""The deployment files (docker/, deploy/) as the tests read them, and traffic that fills every panel."""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from tests.support import REPO

DOCKER = REPO / "docker"


COMPOSE = DOCKER / "compose.yaml"


DASHBOARD = DOCKER / "grafana" / "dashboards" / "stopgate.json"


PROMETHEUS_YML = DOCKER / "prometheus.yml"


# What the test substitutes for Grafana's variables; a rate() window must hold at least two 1 s scrapes.
GRAFANA_VARIABLES = {"__rate_interval": "1m", "route": ".*"}


def load_compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel that draws data (rows are layout only), nested rows included."""
    found: list[dict[str, Any]] = []
    for panel in load_dashboard()["panels"]:
        if panel["type"] == "row":
            found += panel.get("panels", [])
        else:
            found.append(panel)
    return found


def substitute(expr: str) -> str:
    """Replace Grafana's ``$var`` / ``${var}`` with test values; an unknown variable is an error."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in GRAFANA_VARIABLES:
            raise KeyError(f"unknown Grafana variable ${name} in {expr!r}")
        return GRAFANA_VARIABLES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)


def reference_items(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (REPO / "references" / name).read_text().splitlines() if line.strip()]


def fresh_prompts(count: int) -> list[str]:
    """Long problems that no loaded reference set holds, so an early stop gets a shadow rerun, not a gold sample."""
    known = {i["prompt"] for name in ("arith-dev.jsonl", "arith-test.jsonl") for i in reference_items(name)}
    long = [i["prompt"] for i in reference_items("arith-train.jsonl") if i["meta"]["operands"] >= 7]
    prompts = [p for p in long if p not in known][:count]
    assert len(prompts) == count
    return prompts


def traffic() -> list[tuple[dict[str, Any], int]]:
    """(request body, expected status) pairs that give every gateway panel data."""
    completion = {"model": "tinyreason", "temperature": 0}
    budget_stops = [
        ({**completion, "prompt": p, "stopgate": {"policy": "budget", "budget": 20}}, 200) for p in fresh_prompts(4)
    ]
    probed = [
        (
            {
                **completion,
                "prompt": p,
                "stopgate": {"policy": "convergence", "params": {"probe_every": 8, "window": 2}},
            },
            200,
        )
        for p in fresh_prompts(6)[4:]
    ]
    # Gold samples at the controller's settings (no overrides) fill the EM window.
    gold = [
        ({**completion, "prompt": i["prompt"], "reference_id": i["id"]}, 200)
        for i in reference_items("arith-dev.jsonl")[:3]
    ]
    streamed = [({**completion, "prompt": "Q: 5+6+7=?\n", "stream": True}, 200)]
    errors = [
        ({**completion, "model": "no-such-model", "prompt": "Q: 1+1=?\n"}, 404),
        # Longer than the engine's 512-token context: the engine refuses it (an upstream error).
        ({**completion, "prompt": "Q: " + "1+" * 400 + "1=?\n", "max_tokens": 8}, 400),
    ]
    return budget_stops + probed + gold + streamed + errors


def load_scale_compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DOCKER / "compose.scale.yaml").read_text())
    return data
