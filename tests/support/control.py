"""A route with reference items, the admin key and admin reads, for the control plane's tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import yaml

KEY = "test-admin-key-0123456789"


ADMIN = {"authorization": f"Bearer {KEY}"}


ITEMS = [
    {"id": "a1", "prompt": "Q: 1+2=?\n", "answers": ["3"], "route": "arith"},
    {"id": "a2", "prompt": "Q: 2+2=?\n", "answers": ["4"], "route": "arith"},
    {"id": "a3", "prompt": "Q: 5+5=?\n", "answers": ["10"], "route": "arith"},
]


ANSWER_3 = ["<think>", "\n", "1", "+", "2", "=", "3", "\n", "</think>", "\n#### 3"]


def write_jsonl(path: Path, items: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    return path


def routes_file(tmp_path: Path, control: dict[str, Any] | None = None, **evaluation: Any) -> Path:
    refs = write_jsonl(tmp_path / "refs.jsonl", ITEMS)
    route: dict[str, Any] = {
        "aliases": ["tinyreason"],
        "upstream_model": "tinyreason",
        "default_max_tokens": 400,
        "max_tokens_limit": 480,
        "budget": 400,
        "control": {"target": 0.8, "min_budget": 8, **(control or {})},
        "evaluation": {"references": [str(refs)], **evaluation},
    }
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump({"routes": {"arith": route}}))
    return path


def complete(url: str, prompt: str = "Q: 1+2=?\n", **body: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": "arith", "prompt": prompt, **body}, timeout=30)


def state(url: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/admin/routes/arith", headers=ADMIN, timeout=10)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body
