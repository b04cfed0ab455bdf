"""The fleet's route (issue 18): reference items the fake engine gets 90 % right, and the admin key."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.support import REPO

KEY = "fleet-admin-key-0123456789"


ADMIN = {"authorization": f"Bearer {KEY}"}


ROUTE = "arith"


ITEMS = 40  # reference items; the fake engine always answers 3: EM 0.9, so the controller tightens


def write_routes(directory: Path) -> Path:
    refs = directory / "fleet-refs.jsonl"
    lines = [
        json.dumps({"id": f"f{i}", "prompt": f"Q: {i}+0=?\n", "answers": ["4" if i % 10 == 9 else "3"], "route": ROUTE})
        for i in range(ITEMS)
    ]
    refs.write_text("\n".join(lines) + "\n")
    routes = yaml.safe_load((REPO / "gateway" / "routes.yaml").read_text())
    arith = routes["routes"][ROUTE]
    arith["budget"] = 16
    arith["default_max_tokens"] = 64  # what the test sends: a gold sample steers only at the route's settings
    arith["control"] = {
        "target": 0.8,
        "min_budget": 4,
        "max_budget": 64,
        "params": {"min_samples": 4, "cooldown": 6, "max_samples": 12, "window": 20},
    }
    arith["evaluation"] = {"references": [str(refs)], "canary_per_minute": 120, "shadow_share": 0.5}
    routes["routes"] = {ROUTE: arith}
    path = directory / "routes.yaml"
    path.write_text(yaml.safe_dump(routes))
    return path
