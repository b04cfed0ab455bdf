"""Issue 19, pure parts: the cue miner on fixed texts, the cue and brake policies on plain token lists,
main-stream top logprobs in both API shapes, and the weighted vote of an ensemble across stopping settings."""

from __future__ import annotations

import math
from typing import Any

import pytest

from gateway.openai.logprobs import logprob_request, token_choices
from loadtest.cues import candidates, gold_end, make_trace, mine, rank, score, snippet
from policies.base import CONTINUE, PolicyError, TokenChoice, TokenEvent, stop
from policies.brake import BrakePolicy
from policies.cue import CuePolicy
from policies.ensemble import EnsembleParams, Member, beta_above_half, leader_posterior, weighted_judge
from policies.registry import build_policy, ensemble_params

CLOSE = "</think>"


def trace(thinking: str, answer: str = "57", correct: bool = True, ident: str = "t") -> Any:
    text = f"<think>\n{thinking}{CLOSE}\n#### {answer}"
    return make_trace(ident, text, [answer], CLOSE, len(text.split(CLOSE)[0]), len(text), correct)


# A model that verifies after the answer ("check"), and writes "wait" mid-reasoning too.
TRACES = [
    trace("3+8=11\n11+7=8 wait 18\n18+39=57\ncheck\n39+18=57\nok 57\n"),
    trace("50+7=57\ncheck\n7+50=57\nok 57\n"),
    trace("20+30=50\n50+7=57\ncheck\n7+30=37\n37+20=57\nok 57\n"),
    trace("1+6=7 wait 57\ncheck\nok 57\n"),
]


# -- mining ------------------------------------------------------------------


def test_gold_end_is_where_the_gold_answer_first_appears_as_a_whole_number() -> None:
    assert gold_end("x=157\ny=57\n", ["57"]) == len("x=157\ny=57")
    assert gold_end("no answer here", ["57"]) is None


def test_candidates_follow_the_gold_point_and_hold_no_digits() -> None:
    found = candidates(TRACES, window=12, max_len=8)
    assert "\ncheck\n" in found and "check" in found
    assert not any(c.isdigit() for cue in found for c in cue)
    assert "\n" not in found and " " not in found  # all-space pieces are no cue
    assert " wait " not in found  # comes before the gold point, never within the window after it


def test_a_cue_that_comes_before_the_answer_is_scored_wrong_and_one_after_it_right() -> None:
    base = score((), TRACES)
    assert base.em == 1.0 and base.saving == 0.0 and base.stopped == 0
    early = score(("wait",), TRACES)
    assert early.early == 2 and early.em == 0.5  # "wait" stops two traces before their answer
    good = score(("\ncheck\n",), TRACES)
    assert good.early == 0 and good.em == 1.0 and good.stopped == 4 and 0.15 < good.saving < 0.6


def test_rank_keeps_em_and_prefers_the_specific_cue_within_the_slack() -> None:
    ranked = rank(TRACES, window=12, max_len=7, slack=0.2)
    assert ranked and all(s.early == 0 and s.em == 1.0 for s in ranked)
    assert ranked[0].cues == ("\ncheck\n",)
    best_saving = max(s.saving for s in ranked)
    assert ranked[0].saving >= best_saving - 0.2
    tight = rank(TRACES, window=12, max_len=7, slack=0.0)
    assert tight[0].saving == best_saving  # no slack: the earliest stop wins


def test_a_cue_seen_in_an_answer_is_never_proposed() -> None:
    text = "<think>\n5+2=7\ncheck\nok 7\n</think>\n\ncheck\n #### 7"
    answered = [*TRACES[:3], make_trace("a", text, ["7"], CLOSE, 20, 30, True)]
    ranked = rank(answered, window=12, max_len=7)
    assert ranked and not any(s.cues[0] in t.answer for t in answered for s in ranked)
    assert "\ncheck\n" in {s.cues[0] for s in rank(TRACES, window=12, max_len=7)}
    assert "\ncheck\n" not in {s.cues[0] for s in ranked}


def test_mine_returns_nothing_when_every_cue_costs_em() -> None:
    # The only text after the answer also comes before it in another trace: every stop there is early.
    traces = [trace("ok 1+2=3\nok 57\n"), trace("2+55=57\nok\n")]
    assert all(s.early == 0 for s in mine(traces, em_tolerance=0.0))
    assert mine([trace("ok 57\n", correct=False)]) == []


def test_mine_grows_a_set_only_when_a_cue_adds_saving() -> None:
    traces = [trace("50+7=57\ncheck\nok 57\n"), trace("50+7=57\naudit\nok 57\n")]
    picks = mine(traces, window=4, max_len=6, slack=0.0, max_cues=3)
    assert len(picks[0].cues) == 2 and picks[0].em == 1.0 and picks[0].stopped == 2
    single = mine(traces, window=4, max_len=6, slack=0.0, max_cues=1)[0]
    assert single.stopped == 1 and single.saving < picks[0].saving


def test_snippet_is_a_routes_file_with_the_cue_policy() -> None:
    import yaml

    from gateway.settings import DEFAULT_ROUTES, load_routes

    route = load_routes(DEFAULT_ROUTES).routes[0]
    doc = yaml.safe_load(snippet(route, ["\ncheck\n"], "# note\n"))
    assert doc == {"routes": {route.name: {"policy": {"name": "cue", "params": {"cues": ["\ncheck\n"]}}}}}


# -- the cue policy ----------------------------------------------------------


def event(text: str, new: str, phase: str = "thinking", tokens: int = 10, top: Any = None) -> TokenEvent:
    return TokenEvent(phase, new, len(new), tokens, text, None, top)  # type: ignore[arg-type]


def test_cue_policy_stops_when_a_cue_completes_in_the_reasoning() -> None:
    policy = CuePolicy(("\ncheck\n", "Let me verify"))
    assert policy.on_tokens(event("1+2=3\nche", "che")) == CONTINUE
    assert policy.on_tokens(event("1+2=3\ncheck\n", "ck\n")) == stop("cue")
    assert CuePolicy(("verify",)).on_tokens(event("Let me verify", "y")) == stop("cue")


def test_cue_policy_ignores_the_answer_and_old_text() -> None:
    policy = CuePolicy(("check",))
    assert policy.on_tokens(event("#### check", "check", phase="answer")) == CONTINUE
    # A cue far back in the tail was seen (and acted on) when it arrived; new text alone cannot complete it.
    assert policy.on_tokens(event("check" + "x" * 40, "x")) == CONTINUE


def test_cue_policy_hands_its_cues_to_the_engine_as_stop_strings() -> None:
    assert CuePolicy(("\nc", "Wait")).engine_params == {"stop": ["\nc", "Wait"], "include_stop_str_in_output": True}


@pytest.mark.parametrize(
    ("params", "message"),
    [({"cues": []}, "cues"), ({"cues": ["x" * 65]}, "cues"), ({"cues": ["a"] * 17}, "cues"), ({}, "cues"),
     ({"cues": ["a"] * 10_000}, "cues"), ({"cues": [""]}, "cues"), ({"cues": ["a", 1]}, "cues")],
)  # fmt: skip
def test_cue_policy_refuses_bad_cues_naming_the_parameter(params: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        build_policy("cue", params, budget=100)


# -- the brake policy (zero-token) ---------------------------------------------


def choice(token: str, top: dict[str, float]) -> TokenChoice:
    return TokenChoice(token, top.get(token, -5.0), top)


def test_brake_stops_at_a_step_boundary_when_the_close_token_is_within_the_margin() -> None:
    policy = BrakePolicy(margin=1.0)
    near = (choice("\n", {"\n": -0.1}), choice("c", {"c": -0.4, CLOSE: -1.2}))  # gap 0.8 after a newline
    assert policy.on_tokens(event("x\nc", "\nc", top=near)) == stop("brake")


def test_brake_goes_on_when_the_close_token_is_far_or_mid_step_or_absent() -> None:
    policy = BrakePolicy(margin=1.0)
    far = (choice("\n", {"\n": -0.1}), choice("c", {"c": -0.01, CLOSE: -6.0}))
    assert policy.on_tokens(event("x\nc", "\nc", top=far)) == CONTINUE
    mid = (choice("1", {"1": -0.5, CLOSE: -0.6}),)  # close is near, but not after a step
    assert policy.on_tokens(event("x\nc1", "1", top=mid)) == CONTINUE
    absent = (choice("\n", {"\n": -0.1}), choice("2", {"2": -0.1, "3": -0.2}))
    assert policy.on_tokens(event("x\n2", "\n2", top=absent)) == CONTINUE
    assert policy.on_tokens(event("x", "x", top=None)) == CONTINUE  # no logprobs: nothing to read


def test_brake_lets_the_model_close_by_itself_and_holds_off_before_min_tokens() -> None:
    closing = (choice("\n", {"\n": -0.1}), choice(CLOSE, {CLOSE: -0.1}))
    assert BrakePolicy(margin=1.0).on_tokens(event("x\n", "\n", top=closing)) == CONTINUE
    near = (choice("\n", {"\n": -0.1}), choice("c", {"c": -0.4, CLOSE: -1.2}))
    assert BrakePolicy(margin=1.0, min_tokens=20).on_tokens(event("x\nc", "\nc", tokens=10, top=near)) == CONTINUE


@pytest.mark.parametrize(
    ("params", "name"),
    [({"margin": -1}, "margin"), ({"top_logprobs": 0}, "top_logprobs"), ({"top_logprobs": 21}, "top_logprobs"),
     ({"close": ""}, "close"), ({"min_tokens": -1}, "min_tokens"),
     # Issue 19 review: every numeric parameter is finite and bounded.
     ({"min_tokens": 10**400}, "min_tokens"), ({"margin": math.nan}, "margin"), ({"margin": math.inf}, "margin"),
     ({"margin": 10**400}, "margin"), ({"min_confidence": math.nan}, "min_confidence"),
     ({"window": 10**400}, "window")],
)  # fmt: skip
def test_brake_refuses_bad_parameters_naming_them(params: dict[str, Any], name: str) -> None:
    with pytest.raises(PolicyError, match=name):
        build_policy("brake", params, budget=100)


def test_top_logprobs_are_asked_for_and_read_in_both_api_shapes() -> None:
    assert logprob_request("completions", 5) == {"logprobs": 5}
    assert logprob_request("chat", 5) == {"logprobs": True, "top_logprobs": 5}
    completions = {"tokens": ["\n", "c"], "token_logprobs": [-0.1, None], "top_logprobs": [{"\n": -0.1}, {"c": -0.2}]}
    got = token_choices(completions)
    assert got is not None and [c.token for c in got] == ["\n", "c"] and got[1].logprob == -math.inf
    chat = {"content": [{"token": "c", "logprob": -0.2, "top_logprobs": [{"token": CLOSE, "logprob": -1.0}]}]}
    got = token_choices(chat)
    assert got == (TokenChoice("c", -0.2, {CLOSE: -1.0}),)
    assert token_choices(None) is None and token_choices({"content": []}) is None


# -- the ensemble across stopping settings ---------------------------------------


def test_weighted_posterior_matches_the_integer_one() -> None:
    for leader, runner in [(2, 0), (3, 1), (5, 2), (4, 4)]:
        assert beta_above_half(leader + 1, runner + 1) == pytest.approx(leader_posterior(leader, runner), abs=1e-6)


def test_weighted_vote_lets_a_heavy_member_outvote_two_light_ones() -> None:
    members = (Member("cue", {"cues": ["c"]}, weight=3.0), Member("budget", budget=64), Member("budget", budget=96))
    plan = EnsembleParams(wave=3, max_samples=3, confidence=0.7, members=members)
    verdict = weighted_judge(["57", "56", "55"], plan)
    assert verdict.done and verdict.answer == "57"
    assert plan.member(4) == members[1] and plan.weights(4) == [3.0, 1.0, 1.0, 3.0]


def test_weighted_vote_draws_another_wave_when_the_weights_are_close() -> None:
    plan = EnsembleParams(wave=2, max_samples=4, members=(Member("none"), Member("budget", budget=64)))
    verdict = weighted_judge(["57", "56"], plan)
    assert not verdict.done and verdict.next_wave == 2
    assert weighted_judge(["57", "57"], plan).reason == "unanimous"


def test_ensemble_members_are_checked_and_bad_ones_named() -> None:
    plan, _ = ensemble_params(
        {"members": [{"policy": "budget", "budget": 64}, {"policy": "cue", "params": {"cues": ["c"]}, "weight": 2}]},
        budget=400,
    )
    assert plan.members == (Member("budget", {}, 64, 1.0), Member("cue", {"cues": ["c"]}, None, 2.0))
    bad: list[tuple[Any, str]] = [
        ([], "non-empty list"),
        ([{"policy": "ensemble"}], r"members\[0\]"),
        ([{"policy": "cue"}], r"members\[0\].*cues"),
        ([{"policy": "budget", "weight": 0}], "weight"),
        ([{"policy": "budget", "budget": "x"}], "budget"),
        ([{"policy": "budget", "extra": 1}], "unknown key"),
        ([{"policy": "none"}] * 9, "at most 8"),
        # Issue 19 review: the count comes before any member is built, and a weight never overflows to a 500.
        ([{"policy": "cue"}] * 9, "at most 8"),
        ([{"policy": "budget", "weight": 10**400}], r"members\[0\].*'weight'"),
        ([{"policy": "budget", "weight": math.inf}], r"members\[0\].*'weight'"),
        ([{"policy": "budget", "weight": math.nan}], r"members\[0\].*'weight'"),
        ([{"policy": "budget", "weight": -1}], "weight"),
    ]
    for members, message in bad:
        with pytest.raises(PolicyError, match=message):
            ensemble_params({"members": members}, budget=400)


def test_a_cue_set_can_be_the_controllers_strictness_ladder(tmp_path: Any) -> None:
    """Fewer cues stop later: a route may let the controller move between cue sets (strictest first)."""
    from gateway.settings import ConfigError, load_routes
    from tests.support.session import routes_file

    ladder = {"param": "cues", "values": [["\nc", "wait"], ["\nc"]]}
    path = routes_file(tmp_path, policy={"name": "cue", "params": {"cues": ["\nc"]}}, control={"strictness": ladder})
    route = load_routes(path).routes[0]
    assert route.control is not None and route.control.strictness is not None
    assert build_policy("cue", {"cues": route.control.strictness.values[0]}, budget=100).name == "cue"
    bad = {"param": "cues", "values": [[]]}
    with pytest.raises(ConfigError, match="strictness"):
        load_routes(
            routes_file(tmp_path, policy={"name": "cue", "params": {"cues": ["\nc"]}}, control={"strictness": bad})
        )


def test_brake_with_a_window_stops_a_trace_whose_group_confidence_falls() -> None:
    """DeepConf: confidence = -mean of the top alternatives' logprobs; peaked tokens are confident, flat ones not."""
    policy = BrakePolicy(margin=0.0, window=3, min_confidence=2.5)
    peaked = {"a": -0.01, "b": -6.0, "c": -7.0}  # confidence 4.3
    flat = {"a": -1.0, "b": -1.1, "c": -1.2}  # confidence 1.1
    assert policy.on_tokens(event("aaa", "aaa", top=tuple(choice("a", peaked) for _ in range(3)))) == CONTINUE
    assert policy.on_tokens(event("aaab", "b", top=(choice("b", flat),))) == CONTINUE  # (4.3 * 2 + 1.1) / 3 = 3.2
    assert policy.on_tokens(event("aaabb", "b", top=(choice("b", flat),))) == stop("low_confidence")
    assert BrakePolicy(window=3, min_confidence=2.0).on_tokens(event("ab", "ab", top=(choice("b", flat),) * 2)) == (
        CONTINUE  # the window is not full yet
    )
