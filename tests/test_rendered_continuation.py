"""Issue 13, item 2: ``continuation: rendered`` continues a chat on /v1/completions with the rendered prompt.

For chat templates that strip the reasoning from assistant turns (DeepSeek-R1's), a partial assistant message
cannot be continued. The fake engine's template does that too, and its ``/tokenize`` and ``/detokenize``
are exact (one token per character), so the engine request bodies can be asserted to the byte.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.engine.client import Upstream
from gateway.engine.embedded import free_port
from gateway.engine.pool import UpstreamPool
from gateway.errors import UpstreamRejected
from gateway.http.server import serve_in_thread
from gateway.settings import ConfigError, load_routes
from loadtest.fake_engine import FakeEngine, Script, render_chat
from tests.support.chat import MESSAGES, PARSED, REASONING, chat, chat_stream, joined
from tests.support.session import complete, routes_file
from tests.support.waiting import wait_until

RENDERED = render_chat(MESSAGES, add_generation_prompt=True)  # "<|user|>Q: 1+2=?\n<|assistant|>"
ROUTE = {"continuation": "rendered"}


def engine_requests(engine: FakeEngine) -> dict[str, list[dict[str, Any]]]:
    """The engine's requests by what they are: render (tokenize, detokenize), chat, completions."""
    out: dict[str, list[dict[str, Any]]] = {"tokenize": [], "detokenize": [], "chat": [], "completions": []}
    for r in engine.stats.requests:
        if "tokens" in r:
            out["detokenize"].append(r)
        elif "add_generation_prompt" in r and "stream" not in r:
            out["tokenize"].append(r)
        elif "messages" in r:
            out["chat"].append(r)
        else:
            out["completions"].append(r)
    return out


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_rendered_forced_answer_continues_the_rendered_prompt_and_reaches_content(
    session_gateway: Any, stream: bool
) -> None:
    engine, start = session_gateway
    with start(Script(pieces=PARSED, reasoning="reasoning", delay_s=0.001), **ROUTE) as (url, registry):
        if stream:
            chunks = chat_stream(url, stopgate={"budget": 20}, stream_options={"include_usage": True})
            final = [c for c in chunks if c["choices"]][-1]
            reasoning, content = joined(chunks, "reasoning"), joined(chunks, "content")
            assert final["choices"][0]["finish_reason"] == "stop"
            assert all(c["object"] == "chat.completion.chunk" for c in chunks)
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == final["usage"]
        else:
            final = chat(url, stopgate={"budget": 20})
            message = final["choices"][0]["message"]
            reasoning, content = message["reasoning"], message["content"]
            assert final["choices"][0]["finish_reason"] == "stop"
    assert reasoning == "".join(REASONING[:19]) and content == "\n#### 3"
    ext = final["stopgate"]
    assert ext["stop_reason"] == "budget"
    tokens = ext["tokens"]
    assert tokens["thinking"] == 20 and tokens["forced"] == 1
    assert final["usage"]["completion_tokens"] == tokens["thinking"] + tokens["answer"] + tokens["forced"] == 21
    assert tokens["net"] == final["usage"]["completion_tokens"] + tokens["probe"]
    sent = engine_requests(engine)
    assert sent["tokenize"] == [{"model": "tinyreason", "messages": MESSAGES, "add_generation_prompt": True}]
    assert sent["detokenize"] == [{"model": "tinyreason", "tokens": [ord(c) for c in RENDERED]}]
    assert len(sent["chat"]) == 1  # the main stream only: nothing was continued as a message
    assert sent["completions"] == [
        {
            "model": "tinyreason",
            "max_tokens": 16,
            "n": 1,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "prompt": RENDERED + "<think>" + "".join(REASONING[:19]) + "</think>\n####",
            "add_special_tokens": False,
        }
    ]
    assert wait_until(lambda: engine.stats.active == 0)
    assert registry.get_sample_value("stopgate_tokens_total", {"route": "arith", "kind": "forced"}) == 1.0


def test_rendered_probes_share_one_render_and_the_forced_answer_uses_it_too(session_gateway: Any) -> None:
    engine, start = session_gateway
    probe = Script(pieces=[" 3"])
    main = Script(pieces=PARSED, reasoning="reasoning", delay_s=0.01)
    with start(main, probe=probe, **ROUTE) as (url, _):
        body = chat(url, stopgate={"policy": "convergence", "params": {"probe_every": 16, "window": 2}})
    ext = body["stopgate"]
    assert ext["stop_reason"] == "converged" and ext["probes"]["completed"] >= 2
    assert body["choices"][0]["message"]["content"] == "\n#### 3"
    tokens = ext["tokens"]
    assert tokens["net"] == tokens["thinking"] + tokens["answer"] + tokens["forced"] + tokens["probe"]
    assert tokens["probe"] == ext["probes"]["completed"]
    sent = engine_requests(engine)
    assert len(sent["tokenize"]) == len(sent["detokenize"]) == 1  # rendered once per request
    side = sent["completions"]
    assert len(side) == ext["probes"]["launched"] + 1
    assert all(r["prompt"].startswith(RENDERED + "<think>" + "".join(REASONING[:15])) for r in side)
    assert all(r["prompt"].endswith("</think>\n####") for r in side)
    probes = [r for r in side if r["max_tokens"] == 8]
    assert probes and all(r["temperature"] == 0.0 for r in probes)


def test_rendered_render_carries_the_clients_chat_template_and_message_mode_does_too(session_gateway: Any) -> None:
    engine, start = session_gateway
    template = {"chat_template": "{{ messages[0]['content'] }}", "chat_template_kwargs": {"x": 1}}
    with start(Script(pieces=PARSED, reasoning="reasoning"), **ROUTE) as (url, _):
        chat(url, stopgate={"budget": 10}, **template)
    (render,) = engine_requests(engine)["tokenize"]
    assert render["chat_template"] == template["chat_template"] and render["chat_template_kwargs"] == {"x": 1}
    engine.stats.requests.clear()
    engine.stats.headers.clear()
    with start(Script(pieces=PARSED, reasoning="reasoning")) as (url, _):  # continuation: message
        chat(url, stopgate={"budget": 10}, **template)
    sent = engine_requests(engine)
    assert not sent["tokenize"] and len(sent["chat"]) == 2
    forced = sent["chat"][1]
    assert forced["continue_final_message"] is True
    assert forced["chat_template"] == template["chat_template"] and forced["chat_template_kwargs"] == {"x": 1}


def test_rendered_leaves_think_open_out_when_the_generation_prompt_opens_the_thinking(session_gateway: Any) -> None:
    """Templates like newer DeepSeek-R1's end the generation prompt with ``<think>\\n``: it is not repeated."""
    engine, start = session_gateway
    with start(Script(pieces=PARSED, reasoning="reasoning"), **ROUTE) as (url, _):
        chat(url, stopgate={"budget": 10}, chat_template_kwargs={"thinking": True})
    (forced,) = engine_requests(engine)["completions"]
    opened = render_chat(MESSAGES, add_generation_prompt=True, thinking=True)
    assert opened.endswith("<think>\n")
    assert forced["prompt"] == opened + "".join(REASONING[:9]) + "</think>\n####"


def test_rendered_applies_to_chat_only_completions_continue_their_text_prompt(session_gateway: Any) -> None:
    engine, start = session_gateway
    with start(Script(pieces=PARSED), **ROUTE) as (url, _):
        body = complete(url, stopgate={"budget": 10})
    assert body["stopgate"]["stop_reason"] == "budget"
    sent = engine_requests(engine)
    assert not sent["tokenize"] and len(sent["completions"]) == 2
    assert "add_special_tokens" not in sent["completions"][1]


def test_a_route_with_an_unknown_continuation_fails_at_start_up_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="continuation"):
        load_routes(routes_file(tmp_path, continuation="tokens"))


def test_pool_post_json_retries_an_unreachable_replica_and_passes_engine_4xx_on() -> None:
    live = FakeEngine()
    dead = f"http://127.0.0.1:{free_port()}"

    async def run(url: str) -> Any:
        pool = UpstreamPool([Upstream(dead), Upstream(url)], retries=1)
        try:
            tokens = await pool.post_json("/tokenize", {"prompt": "ab"}, request_id="r")
            with pytest.raises(UpstreamRejected):
                await pool.post_json("/nowhere", {}, request_id="r")
            return tokens
        finally:
            await pool.aclose()

    with serve_in_thread(live) as url:
        tokens = asyncio.run(run(url))
    assert tokens["tokens"] == [ord("a"), ord("b")]
    assert live.stats.headers[0]["x-request-id"] == "r"


def test_message_continuation_on_a_stripping_template_is_the_engines_400(session_gateway: Any) -> None:
    engine, start = session_gateway
    engine.strips_reasoning = True
    with start(Script(pieces=PARSED, reasoning="reasoning")) as (url, _):
        r = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "tinyreason", "messages": MESSAGES, "stopgate": {"budget": 10}},
            timeout=30,
        )
    assert r.status_code == 400 and "final message does not appear" in r.json()["error"]["message"]


def test_auto_falls_back_to_rendered_when_the_engine_refuses_the_message(session_gateway: Any) -> None:
    engine, start = session_gateway
    engine.strips_reasoning = True
    probe = Script(pieces=[" 3"])
    main = Script(pieces=PARSED, reasoning="reasoning", delay_s=0.01)
    with start(main, probe=probe, continuation="auto") as (url, _):
        body = chat(url, stopgate={"policy": "convergence", "params": {"probe_every": 16, "window": 2}})
    ext = body["stopgate"]
    assert ext["stop_reason"] == "converged" and ext["probes"]["completed"] >= 2
    assert body["choices"][0]["message"]["content"] == "\n#### 3"
    sent = engine_requests(engine)
    # The main stream, then a refused message continuation (two if two probes raced); each refused one is
    # retried rendered, and everything after goes rendered, on one render.
    refused = sent["chat"][1:]
    assert 1 <= len(refused) <= 2 and all(r["continue_final_message"] is True for r in refused)
    assert len(sent["tokenize"]) == 1
    assert len(sent["completions"]) == ext["probes"]["launched"] + 1
    assert all(r["prompt"].startswith(RENDERED + "<think>") for r in sent["completions"])


def test_auto_keeps_the_message_construction_where_the_template_renders_it(session_gateway: Any) -> None:
    engine, start = session_gateway
    with start(Script(pieces=PARSED, reasoning="reasoning"), continuation="auto") as (url, _):
        body = chat(url, stopgate={"budget": 10})
    assert body["choices"][0]["message"]["content"] == "\n#### 3"
    sent = engine_requests(engine)
    assert not sent["tokenize"] and not sent["completions"] and len(sent["chat"]) == 2


@pytest.mark.parametrize("continuation", ["message", "rendered"])
def test_think_open_left_in_the_first_reasoning_delta_is_not_doubled(session_gateway: Any, continuation: str) -> None:
    """vLLM 0.32's deepseek_r1 streaming parser keeps ``<think>`` when it shares the first delta with more text."""
    engine, start = session_gateway
    coalesced = ["<think>\n", *REASONING[1:], "</think>", "\n#### 3"]
    with start(Script(pieces=coalesced, reasoning="reasoning"), continuation=continuation) as (url, _):
        body = chat(url, stopgate={"budget": 10})
    assert body["choices"][0]["message"]["reasoning"].startswith("<think>\n")  # as the engine sent it
    assert body["choices"][0]["message"]["content"] == "\n#### 3"
    sent = engine_requests(engine)
    side = sent["completions"] if continuation == "rendered" else sent["chat"][1:]
    (forced,) = side
    text = forced["prompt"] if continuation == "rendered" else forced["messages"][-1]["content"]
    assert text.count("<think>") == 1 and text.endswith("<think>\n" + "".join(REASONING[1:10]) + "</think>\n####")
