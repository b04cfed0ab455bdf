"""The raw-ASGI completion endpoints: which requests they take, and that the schema still documents them."""

from __future__ import annotations

from typing import Any

import httpx

from gateway.completions_api import _route_path


def test_the_completion_paths_are_recognised_under_a_root_path() -> None:
    assert _route_path({"path": "/v1/completions", "root_path": ""}) == "/v1/completions"
    assert _route_path({"path": "/api/v1/completions", "root_path": "/api"}) == "/v1/completions"
    assert _route_path({"path": "/v1/completions"}) == "/v1/completions"


def test_the_openapi_schema_still_describes_both_completion_bodies(gateway: Any) -> None:
    url, _, _ = gateway
    spec = httpx.get(f"{url}/openapi.json").json()
    for path, model in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest")):
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"}
        assert model in spec["components"]["schemas"]


def test_a_trailing_slash_still_reaches_the_endpoint(gateway: Any) -> None:
    url, _, _ = gateway
    r = httpx.post(f"{url}/v1/completions/", json={"model": "tinyreason", "prompt": "x"}, follow_redirects=True)
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
