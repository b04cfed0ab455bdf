"""Client keys and a two-route config for the tests of authentication and per-key routes."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml

KEY_ALL = "sk-test-all-routes-0123456789"


KEY_OTHER = "sk-test-other-route-0123456789"


def two_routes(tmp_path: Path, **arith: Any) -> Path:
    base = {"upstream_model": "tinyreason", "default_max_tokens": 400, "max_tokens_limit": 480, "budget": 400}
    path = tmp_path / "routes.yaml"
    routes = {"arith": {**base, "aliases": ["tinyreason"], **arith}, "other": base}
    path.write_text(yaml.safe_dump({"routes": routes}))
    return path


def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.yaml"
    digest = hashlib.sha256(KEY_OTHER.encode()).hexdigest()
    keys = [{"name": "all", "key": KEY_ALL}, {"name": "other-only", "sha256": digest, "routes": ["other"]}]
    path.write_text(yaml.safe_dump({"keys": keys}))
    return path


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}
