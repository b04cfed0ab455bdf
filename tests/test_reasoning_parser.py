"""Issue 13: an engine with a reasoning parser puts the thinking in ``reasoning``; early stopping works the same.

The fake engine streams like vLLM with ``--reasoning-parser deepseek_r1`` (``Script(reasoning=...)``): the
delimiters are tokens that never appear, the thinking comes in ``delta.reasoning`` (or ``reasoning_content``)
and the answer in ``content``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.engine.embedded import engine_command
from gateway.openai.chunks import ChunkParser, ResponseBuilder
from gateway.settings import EngineSettings
from loadtest.fake_engine import FakeEngine, Script
from tests.support.chat import MESSAGES, PARSED, REASONING, chat, chat_stream, joined
from tests.support.engine import kind
from tests.support.waiting import wait_until
from tests.support.wire import sse_events


def requests_of(engine: FakeEngine, which: str) -> list[dict[str, Any]]:
    return [r for r, h in zip(engine.stats.requests, engine.stats.headers, strict=True) if kind(h) == which]


def test_parser_stream_passes_reasoning_through_and_counts_it_as_thinking(session_gateway: Any) -> None:
    _, start = session_gateway
    with start(Script(pieces=PARSED, reasoning="reasoning")) as (url, _):
        chunks = chat_stream(url, stream_options={"include_usage": True})
    assert joined(chunks, "reasoning") == "".join(REASONING)
    assert joined(chunks, "content") == "\n#### 3"
    final = [c for c in chunks if c["choices"]][-1]
    tokens = final["stopgate"]["tokens"]
    assert final["stopgate"]["stop_reason"] == "finished"
    # <think> is counted with the first reasoning chunk, </think> with the first content chunk.
    assert tokens["thinking"] == len(REASONING) + 1 and tokens["answer"] == 8
    usage = final["usage"]
    assert usage["completion_tokens"] == len(PARSED) == tokens["thinking"] + tokens["answer"]
    assert usage["completion_tokens_details"] == {"reasoning_tokens": len(REASONING)}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usage


def test_budget_on_a_parser_stream_forces_the_answer_into_content(session_gateway: Any) -> None:
    """Regression for issue 13: the forced answer continued an empty prefix and leaked `</think>` into content."""
    engine, start = session_gateway
    with start(Script(pieces=PARSED, reasoning="reasoning", delay_s=0.001)) as (url, registry):
        chunks = chat_stream(url, stopgate={"budget": 20})
    assert joined(chunks, "reasoning") == "".join(REASONING[:19])  # <think> is the 20th thinking token
    assert joined(chunks, "content") == "\n#### 3"
    assert all("</think>" not in joined(chunks, k) for k in ("content", "reasoning"))
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] == "stop"
    ext = final["stopgate"]
    assert ext["stop_reason"] == "budget" and ext["tokens"]["thinking"] == 20 and ext["tokens"]["forced"] == 1
    assert final["usage"]["completion_tokens"] == 21
    assert final["usage"]["completion_tokens_details"] == {"reasoning_tokens": 19}
    # The forced answer continues the very reasoning the model wrote, its swallowed <think> put back.
    forced = requests_of(engine, "forced")[0]
    assert forced["messages"][:-1] == MESSAGES
    assert forced["messages"][-1] == {
        "role": "assistant",
        "content": "<think>" + "".join(REASONING[:19]) + "</think>\n####",
    }
    assert forced["continue_final_message"] is True and forced["add_generation_prompt"] is False
    assert wait_until(lambda: engine.stats.active == 0)
    assert registry.get_sample_value("stopgate_tokens_total", {"route": "arith", "kind": "forced"}) == 1.0


def test_non_streamed_parser_response_keeps_the_reasoning_field(session_gateway: Any) -> None:
    _, start = session_gateway
    with start(Script(pieces=PARSED, reasoning="reasoning_content")) as (url, _):
        body = chat(url, stopgate={"budget": 30})
    message = body["choices"][0]["message"]
    assert message["reasoning_content"] == "".join(REASONING[:29]) and "reasoning" not in message
    assert message["content"] == "\n#### 3"
    tokens = body["stopgate"]["tokens"]
    assert body["usage"]["completion_tokens"] == tokens["thinking"] + tokens["answer"] + tokens["forced"] == 31


def test_forced_answer_filed_under_reasoning_by_the_engine_reaches_the_client_as_content(
    session_gateway: Any,
) -> None:
    _, start = session_gateway
    forced = Script(pieces=[" ", "3"], reasoning="reasoning")  # no </think> in its output: all "reasoning"
    with start(Script(pieces=PARSED, reasoning="reasoning"), forced=forced) as (url, _):
        body = chat(url, stopgate={"budget": 10})
    assert body["choices"][0]["message"]["content"] == "\n#### 3"
    assert body["choices"][0]["message"]["reasoning"] == "".join(REASONING[:9])


def test_suffix_text_before_think_close_goes_to_the_reasoning_field(session_gateway: Any) -> None:
    _, start = session_gateway
    route = {"answer_suffix": "\nTime is up.</think>\nAnswer:"}
    with start(Script(pieces=PARSED, reasoning="reasoning"), **route) as (url, _):
        chunks = chat_stream(url, stopgate={"budget": 10})
    assert joined(chunks, "reasoning") == "".join(REASONING[:9]) + "\nTime is up."
    assert joined(chunks, "content") == "\nAnswer: 3"


def test_marker_on_the_cue_in_the_reasoning_stops_and_forces_an_answer(session_gateway: Any) -> None:
    """Regression for issue 13: the cue was only looked for in content, so the client got `content: ''`."""
    engine, start = session_gateway
    cue = ["<think>", *"\n1+2=3\n", *"check\n", *"2+1=3\n", "</think>", *"\n#### 3"]
    with start(Script(pieces=cue, reasoning="reasoning")) as (url, _):
        body = chat(url, stopgate={"policy": "marker", "params": {"pattern": r"\ncheck\n"}})
    assert body["stopgate"]["stop_reason"] == "answer_complete"
    assert body["choices"][0]["message"]["reasoning"] == "\n1+2=3\ncheck\n"
    assert body["choices"][0]["message"]["content"] == "\n#### 3"
    main = requests_of(engine, "main")[0]
    assert main["stop"] == ["\ncheck\n"]  # the engine may stop at the cue itself
    forced = requests_of(engine, "forced")[0]
    assert forced["messages"][-1]["content"] == "<think>\n1+2=3\ncheck\n</think>\n####"


def test_convergence_probes_continue_the_reasoning_and_read_either_field(session_gateway: Any) -> None:
    engine, start = session_gateway
    probe = Script(pieces=[" 3"], reasoning="reasoning")  # an engine that files the probe's answer as reasoning
    with start(Script(pieces=PARSED, reasoning="reasoning", delay_s=0.01), probe=probe) as (url, _):
        body = chat(url, stopgate={"policy": "convergence", "params": {"probe_every": 16, "window": 2}})
    ext = body["stopgate"]
    assert ext["stop_reason"] == "converged" and ext["probes"]["completed"] >= 2
    tokens = ext["tokens"]
    assert tokens["net"] == tokens["thinking"] + tokens["answer"] + tokens["forced"] + tokens["probe"]
    assert body["choices"][0]["message"]["content"] == "\n#### 3"
    first = requests_of(engine, "probe")[0]
    assert first["messages"][-1]["content"].startswith("<think>" + "".join(REASONING[:15]))
    assert first["messages"][-1]["content"].endswith("</think>\n####")


def test_bare_text_chat_still_ends_thinking_at_think_close(session_gateway: Any) -> None:
    _, start = session_gateway
    with start(Script(pieces=PARSED)) as (url, _):
        body = chat(url)
    tokens = body["stopgate"]["tokens"]
    assert tokens["thinking"] == len(REASONING) + 2 and tokens["answer"] == 7
    assert body["choices"][0]["message"]["content"] == "".join(PARSED)
    assert "reasoning" not in body["choices"][0]["message"]


def test_chunk_parser_reads_reasoning_under_either_name() -> None:
    parser = ChunkParser("chat")
    assert parser.parse({"choices": [{"delta": {"role": "assistant", "content": ""}}]})[0].reasoning == ""
    assert parser.reasoning_field is None
    delta = parser.parse({"choices": [{"delta": {"reasoning_content": "x"}}]})[0]
    assert (delta.reasoning, delta.text, delta.tokens, parser.reasoning_field) == ("x", "", 1, "reasoning_content")
    both = parser.parse({"choices": [{"delta": {"reasoning": "y", "reasoning_content": "y", "content": "z"}}]})[0]
    assert (both.reasoning, both.text) == ("y", "z")


def test_response_builder_keeps_each_reasoning_field_the_engine_sent() -> None:
    builder = ResponseBuilder("chat")
    for delta in (
        {"reasoning": "a", "reasoning_content": "a"},
        {"reasoning": "b", "reasoning_content": "b"},
        {"content": "c"},
    ):
        builder.add({"id": "x", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
    message = builder.build()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "c", "reasoning": "ab", "reasoning_content": "ab"}


def test_reasoning_parser_setting_reaches_the_engine_command() -> None:
    cmd = engine_command(EngineSettings(reasoning_parser="deepseek_r1"), port=8000)
    assert cmd[cmd.index("--reasoning-parser") + 1] == "deepseek_r1"
    assert "--reasoning-parser" not in engine_command(EngineSettings(), port=8000)


def test_a_bad_reasoning_parser_name_is_a_clear_start_up_error(tmp_path: Path) -> None:
    args = ["serve", "--upstream", "http://127.0.0.1:9", "--reasoning-parser", "x; rm -rf /"]
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert proc.returncode == 2 and "--reasoning-parser" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])
def test_fake_engine_streams_like_a_reasoning_parser(fake_engine: tuple[FakeEngine, str], field: str) -> None:
    engine, url = fake_engine
    engine.default = Script(pieces=["<think>", "a", "b", "</think>", "c"], reasoning=field)
    body = {"model": "tinyreason", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        events = [e for e in sse_events(r) if e != "[DONE]"]
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    assert deltas == [{"role": "assistant", "content": ""}, {field: "a"}, {field: "b"}, {"content": "c"}]
    assert events[-1]["usage"]["completion_tokens"] == 5
    assert events[-1]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 2}


# -- issue 13 review: a parser deployment whose model writes no reasoning -------------------------

NO_THINKING = ["The", " sum", " is", " 3", "."] * 10  # 50 tokens of content only (Qwen3, enable_thinking=false)


def test_route_with_reasoning_parser_takes_content_as_the_answer_from_its_first_token(session_gateway: Any) -> None:
    _, start = session_gateway
    with start(Script(pieces=NO_THINKING), reasoning_parser=True) as (url, _):
        body = chat(url, stopgate={"budget": 20})
    ext = body["stopgate"]
    assert ext["stop_reason"] == "finished"  # no budget stop: there was no thinking to cut
    assert ext["tokens"]["thinking"] == 0 and ext["tokens"]["answer"] == len(NO_THINKING)
    assert body["choices"][0]["message"]["content"] == "".join(NO_THINKING)


def test_without_the_setting_content_only_chat_is_still_read_as_bare_text(session_gateway: Any) -> None:
    """The default keeps the detection from the stream: content with no think_close yet is thinking."""
    _, start = session_gateway
    with start(Script(pieces=NO_THINKING)) as (url, _):
        body = chat(url, stopgate={"budget": 20})
    assert body["stopgate"]["stop_reason"] == "budget"


def test_route_with_reasoning_parser_still_forces_the_answer_after_reasoning(session_gateway: Any) -> None:
    engine, start = session_gateway
    with start(Script(pieces=PARSED, reasoning="reasoning", delay_s=0.001), reasoning_parser=True) as (url, _):
        chunks = chat_stream(url, stopgate={"budget": 20})
    assert chunks[-1]["stopgate"]["stop_reason"] == "budget"
    assert joined(chunks, "content") == "\n#### 3" and "</think>" not in joined(chunks, "reasoning")
    assert requests_of(engine, "forced")[0]["messages"][-1]["content"].startswith("<think>\n1+2=3")
