"""Issue 5 on the real engine: canary samples flow, and the budget follows the target set through the admin API."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from gateway.engine.embedded import EmbeddedEngine
from gateway.http.app import create_app
from gateway.http.server import serve_in_thread
from gateway.settings import Settings

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parent.parent
KEY = "integration-admin-key"
ADMIN = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def controlled_gateway(vllm_engine: EmbeddedEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    routes = yaml.safe_load((REPO / "gateway" / "routes.yaml").read_text())
    arith = routes["routes"]["arith"]
    arith["evaluation"] = {
        "references": [str(REPO / "references" / "arith-dev.jsonl")],
        "canary_per_minute": 6000,  # back to back: the loop runs one canary at a time
    }
    path = tmp_path_factory.mktemp("routes") / "routes.yaml"
    path.write_text(yaml.safe_dump(routes))
    settings = Settings(
        upstream_url=vllm_engine.url,
        routes_file=path,
        admin_key=SecretStr(KEY),
        state_path=":memory:",
        eval_share=1000.0,  # the few live requests below fund every canary the test needs
        eval_priority=10,  # the embedded engine schedules by priority
    )
    with serve_in_thread(create_app(settings, registry=CollectorRegistry())) as url:
        yield url


def admin(url: str, method: str, path: str, **body: Any) -> dict[str, Any]:
    r = httpx.request(method, f"{url}/admin/routes/arith{path}", json=body or None, headers=ADMIN, timeout=30)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def wait_for(check: Callable[[dict[str, Any]], bool], url: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        state = admin(url, "GET", "")
        if check(state) or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def test_canaries_flow_and_the_budget_follows_the_target(controlled_gateway: str) -> None:
    url = controlled_gateway
    for prompt in ("Q: 7+3+9+4+8=?\n", "Q: 12+30+5=?\n", "Q: 4+4+4+4+4+4=?\n"):  # live tokens fund evaluation
        r = httpx.post(f"{url}/v1/completions", json={"model": "arith", "prompt": prompt, "temperature": 0}, timeout=60)
        assert r.status_code == 200

    # At 64 thinking tokens the bundled model's EM is about 0.66 (models/tinyreason/eval.json).
    # The target first, then the budget: canaries keep flowing, and a controller step that runs between the two
    # calls must already use the new target (a CI run stepped 64 -> 68 with the old target 0.95 after the budget
    # was reset for the 0.4 phase).
    admin(url, "PUT", "/target", target=0.95)
    admin(url, "PUT", "/budget", budget=64)
    raised = wait_for(lambda s: s["budget"] != 64, url, timeout_s=120)
    assert raised["samples"]["canary"] >= 5
    assert raised["budget"] > 64, raised  # EM below a raised target: loosen

    admin(url, "PUT", "/target", target=0.4)
    admin(url, "PUT", "/budget", budget=64)
    lowered = wait_for(lambda s: s["budget"] != 64, url, timeout_s=120)
    assert lowered["budget"] < 64, lowered  # EM well above a lowered target: tighten
    assert lowered["samples"]["canary"] > raised["samples"]["canary"]
    assert lowered["eval_share"]["eval_tokens"] > 0
