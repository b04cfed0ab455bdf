"""Issue 19 through the gateway on the scripted fake engine: the cue's stop strings, the zero-token brake on
scripted main-stream logprobs, and an ensemble whose members differ in stopping settings."""

from __future__ import annotations

from typing import Any

from loadtest.fake_engine import Script
from tests.support.engine import kind
from tests.support.session import complete

CLOSE = "</think>"
# A reasoning trace by lines: the answer (3) is known after the first line; "check" starts re-verifying it.
PIECES = ["<think>", "\n", "1+2=3", "\n", "check", "\n", "2+1=3", "\n", "ok 3", "\n", CLOSE, "\n#### 3"]


def main_requests(engine: Any) -> list[dict[str, Any]]:
    return [r for r, h in zip(engine.stats.requests, engine.stats.headers, strict=True) if kind(h) == "main"]


def test_cue_policy_hands_its_cues_to_the_engine_and_forces_the_answer(session_gateway: Any) -> None:  # noqa: F811
    engine, start = session_gateway
    with start(Script(pieces=PIECES)) as (url, _):
        body = complete(url, stopgate={"policy": "cue", "params": {"cues": ["check"]}})
    ext = body["stopgate"]
    assert ext["policy"] == "cue" and ext["stop_reason"] == "cue"
    assert body["choices"][0]["text"] == "<think>\n1+2=3\ncheck</think>\n#### 3"
    sent = main_requests(engine)[0]
    assert sent["stop"] == ["check"] and sent["include_stop_str_in_output"] is True


def boundary_logprobs(close_at_check: float) -> list[dict[str, float]]:
    """Top logprobs per piece: after each newline the model weighs the next line against closing."""
    tops = []
    for i, piece in enumerate(PIECES):
        after_newline = i > 0 and PIECES[i - 1] == "\n"
        top = {piece: -0.05}
        if after_newline and piece == "check":
            top[CLOSE] = close_at_check
        elif after_newline:
            top[CLOSE] = -8.0
        tops.append(top)
    return tops


def test_brake_stops_at_the_line_where_closing_comes_within_the_margin(session_gateway: Any) -> None:  # noqa: F811
    engine, start = session_gateway
    with start(Script(pieces=PIECES, top_logprobs=boundary_logprobs(close_at_check=-0.5))) as (url, _):
        body = complete(url, stopgate={"policy": "brake", "params": {"margin": 1.0, "top_logprobs": 3}})
    ext = body["stopgate"]
    assert ext["stop_reason"] == "brake" and ext["tokens"]["probe"] == 0  # no probe tokens at all
    assert body["choices"][0]["text"].startswith("<think>\n1+2=3\ncheck")
    assert body["choices"][0]["text"].endswith("</think>\n#### 3") and "2+1=3" not in body["choices"][0]["text"]
    assert body["choices"][0]["logprobs"] is None  # the client did not ask for them
    assert main_requests(engine)[0]["logprobs"] == 3


def test_brake_runs_to_the_end_when_closing_stays_out_of_reach(session_gateway: Any) -> None:  # noqa: F811
    engine, start = session_gateway
    with start(Script(pieces=PIECES, top_logprobs=boundary_logprobs(close_at_check=-6.0))) as (url, _):
        body = complete(url, stopgate={"policy": "brake", "params": {"margin": 1.0}})
    assert body["stopgate"]["stop_reason"] == "finished" and body["choices"][0]["text"] == "".join(PIECES)


def test_brake_on_chat_reads_the_chat_logprob_shape(session_gateway: Any) -> None:  # noqa: F811
    import httpx

    engine, start = session_gateway
    with start(Script(pieces=PIECES, top_logprobs=boundary_logprobs(close_at_check=-0.5))) as (url, _):
        r = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "tinyreason", "messages": [{"role": "user", "content": "1+2"}],
                  "stopgate": {"policy": "brake", "params": {"margin": 1.0}}},
            timeout=30,
        )  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["stopgate"]["stop_reason"] == "brake"
    sent = main_requests(engine)[0]
    assert sent["logprobs"] is True and sent["top_logprobs"] == 5


def test_ensemble_members_run_their_own_settings_and_the_weighted_vote_decides(session_gateway: Any) -> None:  # noqa: F811
    engine, start = session_gateway

    def respond(body: dict[str, Any], headers: dict[str, str]) -> Script:
        rid = headers.get("x-request-id", "")
        if kind(headers) == "forced":  # the cue member knows the answer at its cue; the budgets cut it short
            return Script(pieces=[" 3" if rid.endswith("-s0-forced") else " 4"])
        if rid.endswith("-s0"):
            return Script(pieces=PIECES)  # the cue member: "3", after its cue
        return Script(pieces=["<think>", "\n"] + ["1+2=3\n"] * 30 + [CLOSE, "\n#### 3"])

    members = [
        {"policy": "cue", "params": {"cues": ["check"]}, "weight": 3},
        {"policy": "budget", "budget": 4},
        {"policy": "budget", "budget": 5},
    ]
    with start(Script()) as (url, _):
        engine.responder = respond
        body = complete(
            url,
            temperature=0,
            stopgate={"policy": "ensemble", "params": {"wave": 3, "max_samples": 3, "confidence": 0.8,
                                                       "members": members}},
        )  # fmt: skip
    ext = body["stopgate"]
    assert ext["ensemble"]["samples"] == 3 and ext["ensemble"]["votes"] == ["3", "4", "4"]
    assert ext["ensemble"]["answer"] == "3" and ext["ensemble"]["inner"] == "members"  # weight 3 beats 1 + 1
    sent = {h["x-request-id"][-3:]: r for r, h in zip(engine.stats.requests, engine.stats.headers, strict=True)}
    assert sent["-s0"]["stop"] == ["check"] and "stop" not in sent["-s1"]
    assert all(r["temperature"] == 0 for k, r in sent.items() if k.startswith("-s"))


# -- issue 19 review: the brake when the client asks for logprobs itself ------------------------


def test_brake_fires_when_the_client_asks_for_fewer_top_logprobs_and_gets_its_own_count(
    session_gateway: Any,  # noqa: F811
) -> None:
    """The engine is asked for the policy's count; each token's alternatives are cut back to the client's."""
    engine, start = session_gateway
    with start(Script(pieces=PIECES, top_logprobs=boundary_logprobs(close_at_check=-0.5))) as (url, _):
        body = complete(url, logprobs=1, stopgate={"policy": "brake", "params": {"margin": 1.0, "top_logprobs": 3}})
    assert body["stopgate"]["stop_reason"] == "brake"
    assert main_requests(engine)[0]["logprobs"] == 3
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs is not None and logprobs["tokens"][:3] == ["<think>", "\n", "1+2=3"]
    assert all(len(top) == 1 for top in logprobs["top_logprobs"])  # the client asked for one alternative
    assert CLOSE not in logprobs["top_logprobs"][4]  # "check": the close token the brake read is cut


def test_brake_fires_when_the_client_asks_for_more_top_logprobs_and_keeps_them(session_gateway: Any) -> None:  # noqa: F811
    engine, start = session_gateway
    with start(Script(pieces=PIECES, top_logprobs=boundary_logprobs(close_at_check=-0.5))) as (url, _):
        body = complete(url, logprobs=4, stopgate={"policy": "brake", "params": {"margin": 1.0, "top_logprobs": 3}})
    assert body["stopgate"]["stop_reason"] == "brake"
    assert main_requests(engine)[0]["logprobs"] == 4
    assert CLOSE in body["choices"][0]["logprobs"]["top_logprobs"][4]


def test_brake_on_chat_fires_even_with_logprobs_false_and_returns_none(session_gateway: Any) -> None:  # noqa: F811
    import httpx

    engine, start = session_gateway
    with start(Script(pieces=PIECES, top_logprobs=boundary_logprobs(close_at_check=-0.5))) as (url, _):
        r = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "tinyreason", "messages": [{"role": "user", "content": "1+2"}], "logprobs": False,
                  "stopgate": {"policy": "brake", "params": {"margin": 1.0}}},
            timeout=30,
        )  # fmt: skip
        bad = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "tinyreason", "messages": [{"role": "user", "content": "1+2"}], "logprobs": True,
                  "top_logprobs": 10**400, "stopgate": {"policy": "brake", "params": {"margin": 1.0}}},
            timeout=30,
        )  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["stopgate"]["stop_reason"] == "brake"
    assert r.json()["choices"][0]["logprobs"] is None
    sent = main_requests(engine)[0]
    assert sent["logprobs"] is True and sent["top_logprobs"] == 5
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_logprobs"


def test_brake_on_chat_trims_the_alternatives_to_the_clients_top_logprobs(session_gateway: Any) -> None:  # noqa: F811
    import httpx

    engine, start = session_gateway
    with start(Script(pieces=PIECES, top_logprobs=boundary_logprobs(close_at_check=-0.5))) as (url, _):
        r = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "tinyreason", "messages": [{"role": "user", "content": "1+2"}], "logprobs": True,
                  "top_logprobs": 1, "stopgate": {"policy": "brake", "params": {"margin": 1.0}}},
            timeout=30,
        )  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["stopgate"]["stop_reason"] == "brake"
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert content and all(len(entry["top_logprobs"]) <= 1 for entry in content)
    assert main_requests(engine)[0]["top_logprobs"] == 5


# -- issue 19 review: a cue in the answer must not end it ---------------------------------------------

# The engine ends at the cue it was handed as a stop string, though the reasoning is over: the answer is cut.
CUT = ["<think>", "\n", "1+2=3", "\n", CLOSE, "\n", "Let me check"]
REST = [" it: 2+1=3", "\n#### 3"]


def resume_responder(engine: Any) -> None:
    def respond(body: dict[str, Any], headers: dict[str, str]) -> Script:
        if headers.get("x-request-id", "").endswith("-resumed"):
            return Script(pieces=REST)
        return Script(pieces=CUT, stop_reason="check")

    engine.responder = respond


def test_a_cue_in_the_answer_does_not_end_it_the_answer_is_resumed_without_stop_strings(
    session_gateway: Any,  # noqa: F811
) -> None:
    engine, start = session_gateway
    with start(Script()) as (url, _):
        resume_responder(engine)
        body = complete(url, stopgate={"policy": "cue", "params": {"cues": ["check"]}})
    choice = body["choices"][0]
    assert choice["text"] == "".join(CUT + REST) and choice["finish_reason"] == "stop"
    assert "stop_reason" not in choice  # the engine's cue stop is not reported as the end
    ext = body["stopgate"]
    assert ext["stop_reason"] == "finished" and ext["tokens"]["answer"] == 2 and ext["tokens"]["forced"] == 2
    assert body["usage"]["completion_tokens"] == len(CUT) + len(REST)
    main, resumed = engine.stats.requests
    assert main["stop"] == ["check"]
    assert "stop" not in resumed and resumed["prompt"].endswith("".join(CUT))
    assert resumed["max_tokens"] == 400 - len(CUT)


def test_a_cue_in_a_parser_streams_answer_is_resumed_with_the_reasoning_and_delimiters(
    session_gateway: Any,  # noqa: F811
) -> None:
    import httpx

    engine, start = session_gateway
    with start(Script()) as (url, _):

        def respond(body: dict[str, Any], headers: dict[str, str]) -> Script:
            if headers.get("x-request-id", "").endswith("-resumed"):
                return Script(pieces=REST)
            return Script(pieces=CUT, stop_reason="check", reasoning="reasoning")

        engine.responder = respond
        r = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "tinyreason", "messages": [{"role": "user", "content": "1+2"}],
                  "stopgate": {"policy": "cue", "params": {"cues": ["check"]}}},
            timeout=30,
        )  # fmt: skip
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert message["reasoning"] == "\n1+2=3\n"
    assert message["content"] == "\nLet me check" + "".join(REST)
    resumed = engine.stats.requests[-1]
    assert resumed["messages"][-1] == {"role": "assistant", "content": "<think>\n1+2=3\n</think>\nLet me check"}
    assert "stop" not in resumed and resumed["continue_final_message"] is True


def test_a_huge_or_bad_member_weight_is_a_400_naming_stopgate_not_a_500(session_gateway: Any) -> None:  # noqa: F811
    import httpx

    engine, start = session_gateway
    with start(Script()) as (url, _):
        codes = []
        for weight in (10**400, -1, "x"):
            members = [{"policy": "budget", "budget": 4, "weight": weight}]
            r = httpx.post(
                f"{url}/v1/completions",
                json={"model": "tinyreason", "prompt": "1+2", "stopgate": {"policy": "ensemble",
                                                                            "params": {"members": members}}},
                timeout=30,
            )  # fmt: skip
            codes.append((r.status_code, r.json()["error"]["param"], "weight" in r.json()["error"]["message"]))
        # A client that sends logprobs: false on completions still gets the brake, and no logprobs back.
        body = complete(url, logprobs=False, stopgate={"policy": "brake", "params": {"margin": 1.0}})
    assert codes == [(400, "stopgate", True)] * 3
    assert body["choices"][0]["logprobs"] is None and main_requests(engine)[-1]["logprobs"] == 5
    assert len(main_requests(engine)) == 1  # none of the bad ensembles reached the engine
