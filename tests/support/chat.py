"""Chat against the fake engine with a reasoning parser (issue 13): messages, scripted thinking, calls."""

from __future__ import annotations

from typing import Any

import httpx

from tests.support.wire import sse_events

MESSAGES = [{"role": "user", "content": "Q: 1+2=?"}]


REASONING = list("\n1+2=3\n") * 30  # 210 tokens of thinking


PARSED = ["<think>", *REASONING, "</think>", "\n", "#", "#", "#", "#", " ", "3"]


def chat(url: str, **extra: Any) -> dict[str, Any]:
    body = {"model": "tinyreason", "messages": MESSAGES, **extra}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json())


def chat_stream(url: str, **extra: Any) -> list[dict[str, Any]]:
    body = {"model": "tinyreason", "messages": MESSAGES, "stream": True, **extra}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200, r.read()
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    return events[:-1]


def joined(chunks: list[dict[str, Any]], key: str) -> str:
    return "".join(str(c["choices"][0].get("delta", {}).get(key) or "") for c in chunks if c["choices"])
