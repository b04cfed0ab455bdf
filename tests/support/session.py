"""A one-route gateway for the generation session's tests: its routes file, prompt and a completion call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import yaml

PROMPT = "Q: 1+2=?\n"


THINKING = ["<think>", "\n"] + list("1+2=3\n") * 40  # 242 tokens of "reasoning"


def routes_file(tmp_path: Path, **route: Any) -> Path:
    base: dict[str, Any] = {
        "aliases": ["tinyreason"],
        "upstream_model": "tinyreason",
        "default_max_tokens": 400,
        "max_tokens_limit": 480,
        "budget": 400,
    }
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump({"routes": {"arith": {**base, **route}}}))
    return path


def complete(url: str, **extra: Any) -> dict[str, Any]:
    r = httpx.post(f"{url}/v1/completions", json={"model": "tinyreason", "prompt": PROMPT, **extra}, timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json())
