"""The OpenAI wire format as a client sees it: SSE events and the error schema."""

from __future__ import annotations

import json
from typing import Any

import httpx


def sse_events(response: httpx.Response) -> list[Any]:
    events: list[Any] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_openai_error(r: httpx.Response, status: int, *, param: str | None = None, says: str = "") -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param
    assert says.lower() in err["message"].lower(), err["message"]
    assert "Traceback" not in r.text
    return dict(err)
