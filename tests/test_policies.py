"""Stop policies driven with scripted token events and probe results.

Policies are pure state machines, so every test here is a plain list of
inputs and the exact decisions expected back: no engine, no gateway.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections.abc import Sequence
from typing import Any

import pytest

from policies.base import CONTINUE, PROBE, Action, Decision, PolicyError, ProbeResult, StopPolicy, TokenEvent, stop
from policies.budget import BudgetPolicy
from policies.compose import Bounded
from policies.confidence import ConfidencePolicy, confidence
from policies.convergence import ConvergencePolicy
from policies.ensemble import EnsembleParams, Verdict, judge, leader_posterior, majority
from policies.loop import LoopPolicy, is_looping
from policies.marker import MarkerPolicy, literal
from policies.none import NoPolicy
from policies.registry import NAMES, STREAM_POLICIES, build_policy, ensemble_params, validate
from policies.static import StaticPolicy

C = CONTINUE
P = PROBE

# What the bundled model writes: short arithmetic lines, some of them alike.
BUNDLED_REASONING = "<think>\n3+5=8\n8+9=17\n17+2=19\ncheck\n2+9=11\n11+5=16\n16+3=19\nok 19\n"
GSM8K_MARKER = r"####\s*-?[\d,.]+\s"


# -- helpers ---------------------------------------------------------------


def thinking(tokens: int, text: str = "", new_tokens: int = 1) -> TokenEvent:
    return TokenEvent(phase="thinking", new_text="", new_tokens=new_tokens, thinking_tokens=tokens, text=text)


def answering(text: str, thinking_tokens: int = 10_000) -> TokenEvent:
    return TokenEvent(phase="answer", new_text="", new_tokens=1, thinking_tokens=thinking_tokens, text=text)


def probe(at: int, answer: str | None, text: str | None = None, logprobs: Sequence[float] | None = None) -> ProbeResult:
    return ProbeResult(
        at_tokens=at,
        answer=answer,
        text=(answer or "") if text is None else text,
        logprobs=None if logprobs is None else tuple(logprobs),
    )


def feed_tokens(policy: StopPolicy, counts: Sequence[int]) -> list[Decision]:
    return [policy.on_tokens(thinking(n)) for n in counts]


def feed_texts(policy: StopPolicy, texts: Sequence[str]) -> list[Decision]:
    return [policy.on_tokens(thinking(i + 1, text)) for i, text in enumerate(texts)]


def feed_probes(policy: StopPolicy, results: Sequence[ProbeResult]) -> list[Decision]:
    return [policy.on_probe(r) for r in results]


def prefixes(text: str) -> list[str]:
    """Every cumulative text a stream of one-character deltas would show."""
    return [text[:i] for i in range(1, len(text) + 1)]


def probes_at_every(step: int, answers: Sequence[str | None], texts: Sequence[str] | None = None) -> list[ProbeResult]:
    texts = texts if texts is not None else [a or "" for a in answers]
    return [probe((i + 1) * step, a, t) for i, (a, t) in enumerate(zip(answers, texts, strict=True))]


def lp(*probs: float) -> tuple[float, ...]:
    return tuple(math.log(p) for p in probs)


# -- base ------------------------------------------------------------------


def test_decisions_are_frozen() -> None:
    decision = stop("budget")
    assert decision == Decision(Action.STOP, "budget")
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.reason = "other"  # type: ignore[misc]


# -- budget ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("budget", "counts", "expected"),
    [
        pytest.param(10, [1, 5, 9], [C, C, C], id="below-budget"),
        pytest.param(10, [9, 10], [C, stop("budget")], id="exactly-at-budget"),
        pytest.param(10, [3, 25], [C, stop("budget")], id="one-event-jumps-past-budget"),
        pytest.param(10, [10, 11, 12], [stop("budget")] * 3, id="keeps-saying-stop"),
        pytest.param(1, [1], [stop("budget")], id="budget-of-one"),
    ],
)
def test_budget_forces_answer_when_thinking_reaches_budget(
    budget: int, counts: list[int], expected: list[Decision]
) -> None:
    assert feed_tokens(BudgetPolicy(budget), counts) == expected


def test_budget_never_stops_in_answer_phase() -> None:
    policy = BudgetPolicy(10)
    assert [policy.on_tokens(answering("42", thinking_tokens=n)) for n in (9, 10, 500)] == [C, C, C]


def test_budget_ignores_probes() -> None:
    assert BudgetPolicy(10).on_probe(probe(100, "42")) == C


@pytest.mark.parametrize("budget", [0, -5], ids=["zero", "negative"])
def test_budget_below_one_is_refused(budget: int) -> None:
    with pytest.raises(PolicyError, match="budget"):
        BudgetPolicy(budget)


# -- marker ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("so the total is 42", C, id="no-marker"),
        pytest.param("####", C, id="marker-without-number"),
        pytest.param("#### 4", C, id="number-still-streaming"),
        pytest.param("#### 42", C, id="number-not-yet-terminated"),
        pytest.param("#### 42\n", stop("answer_complete"), id="number-then-newline"),
        pytest.param("#### -1,234.5 ", stop("answer_complete"), id="signed-number-with-separators"),
        pytest.param("work...\n####42\nmore", stop("answer_complete"), id="marker-in-the-middle"),
    ],
)
def test_marker_stops_only_on_a_complete_answer(text: str, expected: Decision) -> None:
    policy = MarkerPolicy(GSM8K_MARKER)
    assert policy.on_tokens(thinking(5, text)) == expected
    assert MarkerPolicy(GSM8K_MARKER).on_tokens(answering(text)) == expected


def test_marker_waits_through_a_streamed_number_and_stops_when_it_ends() -> None:
    texts = ["The answer", "The answer\n####", "The answer\n#### 1", "The answer\n#### 17", "The answer\n#### 17\n"]
    assert feed_texts(MarkerPolicy(GSM8K_MARKER), texts) == [C, C, C, C, stop("answer_complete")]


def test_marker_searches_only_the_recent_tail() -> None:
    policy = MarkerPolicy(GSM8K_MARKER)
    assert policy.on_tokens(thinking(5, "#### 42\n" + "x" * 600)) == C


@pytest.mark.parametrize(
    ("pattern", "stop"),
    [
        pytest.param(r"\ncheck\n", "\ncheck\n", id="escaped-newlines"),
        pytest.param("\ncheck\n", "\ncheck\n", id="raw-newlines"),
        pytest.param(r"a\.b", "a.b", id="escaped-dot"),
        pytest.param("#### done", "#### done", id="hash-and-space"),
        pytest.param("a.b", None, id="dot"),
        pytest.param(GSM8K_MARKER, None, id="classes-and-repeats"),
        pytest.param(r"\bword", None, id="anchor"),
    ],
)
def test_marker_hands_only_a_plain_string_to_the_engine(pattern: str, stop: str | None) -> None:
    assert literal(pattern) == stop
    expected = {} if stop is None else {"stop": [stop], "include_stop_str_in_output": True}
    assert MarkerPolicy(pattern).engine_params == expected
    if stop is not None:
        assert re.fullmatch(pattern, stop)  # the engine stops exactly where the regex would


@pytest.mark.parametrize("pattern", ["(", "[0-9", "*a"], ids=["open-group", "open-class", "nothing-to-repeat"])
def test_marker_invalid_regex_is_a_policy_error_naming_pattern(pattern: str) -> None:
    with pytest.raises(PolicyError, match="^pattern: "):
        MarkerPolicy(pattern)


# -- convergence: when to probe ---------------------------------------------


@pytest.mark.parametrize(
    ("probe_every", "min_tokens", "counts", "expected"),
    [
        pytest.param(10, 0, [5, 9, 10, 15, 19, 20, 30], [C, C, P, C, C, P, P], id="every-k-tokens"),
        pytest.param(10, 0, [5, 35, 39, 40, 41], [C, P, C, P, C], id="jump-past-three-points-probes-once"),
        pytest.param(10, 0, [10, 10, 10], [P, C, C], id="same-count-probes-once"),
        pytest.param(10, 0, [100, 109, 110], [P, C, P], id="big-jump-advances-next-point"),
        pytest.param(10, 25, [10, 20, 24, 25, 34, 35], [C, C, C, P, C, P], id="min-tokens-delays-first-probe"),
        pytest.param(10, 5, [5, 9, 10], [C, C, P], id="min-tokens-below-k-changes-nothing"),
        pytest.param(1, 0, [1, 2, 3], [P, P, P], id="every-token"),
    ],
)
def test_convergence_probes_every_k_thinking_tokens(
    probe_every: int, min_tokens: int, counts: list[int], expected: list[Decision]
) -> None:
    policy = ConvergencePolicy(probe_every=probe_every, min_tokens=min_tokens)
    assert feed_tokens(policy, counts) == expected


def test_convergence_never_probes_in_answer_phase() -> None:
    policy = ConvergencePolicy(probe_every=10)
    assert [policy.on_tokens(answering("42", thinking_tokens=n)) for n in (10, 20, 100)] == [C, C, C]


# -- convergence: when to stop ----------------------------------------------

CONVERGED = stop("converged")


@pytest.mark.parametrize(
    ("window", "answers", "texts", "expected"),
    [
        pytest.param(3, ["42", "42", "42"], None, [C, C, CONVERGED], id="three-equal-answers"),
        # Dynasor issue #25: its rule stopped on w non-empty answers even when they differed.
        pytest.param(3, ["41", "42", "43"], None, [C, C, C], id="issue-25-non-empty-but-different"),
        pytest.param(3, ["42", "43", "42"], None, [C, C, C], id="a-b-a-does-not-agree"),
        pytest.param(3, ["1", "2", "2", "2"], None, [C, C, C, CONVERGED], id="agrees-after-a-change"),
        pytest.param(3, ["42", None, "42", "42"], None, [C, C, C, C], id="none-breaks-the-streak"),
        pytest.param(3, ["42", None, "42", "42", "42"], None, [C, C, C, C, CONVERGED], id="streak-restarts-after-none"),
        pytest.param(3, ["42", "", "42", "42"], None, [C, C, C, C], id="empty-answer-breaks-the-streak"),
        pytest.param(3, [None, None, None], None, [C, C, C], id="all-none-never-stops"),
        pytest.param(
            3, ["42", "42", "42"], ["42", "Wait, 42?", "42"], [C, C, C], id="hesitation-in-text-counts-as-empty"
        ),
        pytest.param(
            3,
            ["42", "42", "42", "42"],
            ["42", "hmm 42", "42", "42"],
            [C, C, C, C],
            id="hesitation-then-two-agreeing",
        ),
        pytest.param(2, ["7", "7"], ["HOWEVER 7", "7"], [C, C], id="hesitation-is-case-insensitive"),
        pytest.param(1, [None, "7"], None, [C, CONVERGED], id="window-1-stops-on-first-non-empty"),
        pytest.param(1, ["7"], ["let me check: 7"], [C], id="window-1-skips-hesitant-answer"),
        pytest.param(2, ["7", "7", "7"], None, [C, CONVERGED, CONVERGED], id="keeps-saying-stop"),
    ],
)
def test_convergence_stops_only_when_last_window_answers_agree(
    window: int, answers: list[str | None], texts: list[str] | None, expected: list[Decision]
) -> None:
    policy = ConvergencePolicy(probe_every=32, window=window)
    assert feed_probes(policy, probes_at_every(32, answers, texts)) == expected


@pytest.mark.parametrize(
    ("results", "expected"),
    [
        pytest.param([probe(64, "42"), probe(32, "42"), probe(96, "42")], [C, C, C], id="older-result-does-not-count"),
        pytest.param(
            [probe(64, "42"), probe(64, "42"), probe(96, "42")], [C, C, C], id="same-at-tokens-does-not-count"
        ),
        pytest.param(
            [probe(64, "42"), probe(96, "42"), probe(32, None), probe(128, "42")],
            [C, C, C, CONVERGED],
            id="stale-none-does-not-break-the-streak",
        ),
        pytest.param([probe(0, "42"), probe(1, "42"), probe(2, "42")], [C, C, CONVERGED], id="at-zero-is-not-stale"),
    ],
)
def test_convergence_ignores_stale_probe_results(results: list[ProbeResult], expected: list[Decision]) -> None:
    assert feed_probes(ConvergencePolicy(window=3), results) == expected


def test_convergence_custom_hesitation_words_are_matched_case_insensitively() -> None:
    policy = ConvergencePolicy(window=1, hesitation_words=("Maybe",))
    assert policy.on_probe(probe(32, "42", "maybe 42")) == C
    assert policy.on_probe(probe(64, "42", "wait, 42")) == CONVERGED  # the defaults are replaced


@pytest.mark.parametrize(
    ("params", "name"),
    [
        pytest.param({"probe_every": 0}, "probe_every", id="probe-every-zero"),
        pytest.param({"window": 0}, "window", id="window-zero"),
        pytest.param({"min_tokens": -1}, "min_tokens", id="negative-min-tokens"),
    ],
)
def test_convergence_refuses_out_of_range_params(params: dict[str, Any], name: str) -> None:
    with pytest.raises(PolicyError, match=f"^{name}: "):
        ConvergencePolicy(**params)


def _convergence_reference(window: int, effective: list[str | None]) -> bool:
    recent = effective[-window:]
    return len(recent) == window and recent[0] is not None and len(set(recent)) == 1


@pytest.mark.parametrize("seed", range(20), ids=lambda s: f"seed-{s}")
def test_convergence_stops_iff_last_window_answers_are_equal_and_non_empty_random(seed: int) -> None:
    rng = random.Random(seed)
    window = rng.randint(1, 4)
    policy = ConvergencePolicy(probe_every=8, window=window)
    effective: list[str | None] = []
    at = 0
    for _ in range(60):
        if effective and rng.random() < 0.15:  # a stale result, changes nothing
            assert policy.on_probe(probe(rng.randint(0, at), rng.choice(["1", "2"]))) == C
            continue
        at += rng.randint(1, 20)
        answer = rng.choice(["1", "1", "1", "2", None, ""])
        hesitant = rng.random() < 0.1
        text = f"hmm {answer}" if hesitant else (answer or "")
        effective.append(None if hesitant or not answer else answer)
        decision = policy.on_probe(probe(at, answer, text))
        assert decision == (CONVERGED if _convergence_reference(window, effective) else C), effective


@pytest.mark.parametrize("seed", range(20), ids=lambda s: f"seed-{s}")
def test_convergence_probes_once_per_event_that_crosses_a_probe_point_random(seed: int) -> None:
    rng = random.Random(seed)
    k = rng.randint(1, 40)
    min_tokens = rng.choice([0, rng.randint(0, 100)])
    policy = ConvergencePolicy(probe_every=k, min_tokens=min_tokens)
    first = max(k, min_tokens)
    previous, count = -1, 0
    for _ in range(80):
        count += rng.choice([0, 1, 1, 3, rng.randint(1, 3 * k)])
        crossed = any(previous < p <= count for p in range(first, count + 1, k))
        assert policy.on_tokens(thinking(count)) == (P if crossed else C), (k, min_tokens, previous, count)
        previous = count


# -- confidence ------------------------------------------------------------

CONFIDENT = stop("confident")


@pytest.mark.parametrize(
    ("aggregate", "threshold", "logprobs", "expected"),
    [
        pytest.param("mean", 0.95, lp(0.99, 0.93), CONFIDENT, id="mean-above-threshold"),
        pytest.param("mean", 0.95, lp(0.9, 0.9), C, id="mean-below-threshold"),
        pytest.param("min", 0.95, lp(0.99, 0.93), C, id="min-below-threshold-though-mean-above"),
        pytest.param("min", 0.9, lp(0.99, 0.93), CONFIDENT, id="min-above-threshold"),
        pytest.param("mean", 1.0, (0.0, 0.0), CONFIDENT, id="exactly-at-threshold-stops"),
        pytest.param("mean", 1.0, (0.0, -1e-9), C, id="just-below-threshold"),
        pytest.param("min", 0.5, lp(1.0, 0.5, 1.0), CONFIDENT, id="min-at-threshold"),
        pytest.param("mean", 0.1, (-math.inf,), C, id="zero-probability"),
    ],
)
def test_confidence_stops_when_probability_reaches_threshold(
    aggregate: str, threshold: float, logprobs: tuple[float, ...], expected: Decision
) -> None:
    policy = ConfidencePolicy(threshold=threshold, aggregate=aggregate)
    assert policy.on_probe(probe(32, "42", logprobs=logprobs)) == expected


@pytest.mark.parametrize(
    "result",
    [
        pytest.param(probe(32, None, "", logprobs=(0.0,)), id="no-answer"),
        pytest.param(probe(32, "", "", logprobs=(0.0,)), id="empty-answer"),
        pytest.param(probe(32, "42", logprobs=None), id="missing-logprobs"),
        pytest.param(probe(32, "42", logprobs=()), id="empty-logprobs"),
    ],
)
def test_confidence_never_stops_without_answer_or_logprobs(result: ProbeResult) -> None:
    assert ConfidencePolicy(threshold=0.01).on_probe(result) == C


def test_confidence_ignores_stale_probe_results() -> None:
    policy = ConfidencePolicy(threshold=0.9)
    results = [probe(64, "41", logprobs=lp(0.2)), probe(32, "42", logprobs=(0.0,)), probe(64, "42", logprobs=(0.0,))]
    assert feed_probes(policy, results) == [C, C, C]
    assert policy.on_probe(probe(96, "42", logprobs=(0.0,))) == CONFIDENT


def test_confidence_probes_on_the_same_schedule_as_convergence() -> None:
    policy = ConfidencePolicy(probe_every=10, min_tokens=15)
    assert feed_tokens(policy, [10, 14, 15, 24, 60, 64, 65]) == [C, C, P, C, P, C, P]
    assert policy.on_tokens(answering("42", thinking_tokens=75)) == C


def test_confidence_wants_logprobs() -> None:
    assert ConfidencePolicy().wants_logprobs is True
    assert ConvergencePolicy().wants_logprobs is False


@pytest.mark.parametrize(
    ("logprobs", "aggregate", "value"),
    [
        pytest.param((0.0, math.log(0.5)), "mean", 0.75, id="mean"),
        pytest.param((0.0, math.log(0.5)), "min", 0.5, id="min"),
        pytest.param((math.log(0.25),), "mean", 0.25, id="single-token"),
    ],
)
def test_confidence_aggregates_token_probabilities(logprobs: tuple[float, ...], aggregate: str, value: float) -> None:
    assert confidence(logprobs, aggregate) == pytest.approx(value)


@pytest.mark.parametrize(
    ("params", "name"),
    [
        pytest.param({"threshold": 0.0}, "threshold", id="threshold-zero"),
        pytest.param({"threshold": -0.1}, "threshold", id="threshold-negative"),
        pytest.param({"threshold": 1.01}, "threshold", id="threshold-above-one"),
        pytest.param({"aggregate": "max"}, "aggregate", id="unknown-aggregate"),
        pytest.param({"probe_every": 0}, "probe_every", id="probe-every-zero"),
        pytest.param({"min_tokens": -1}, "min_tokens", id="negative-min-tokens"),
    ],
)
def test_confidence_refuses_out_of_range_params(params: dict[str, Any], name: str) -> None:
    with pytest.raises(PolicyError, match=f"^{name}: "):
        ConfidencePolicy(**params)


# -- loop ------------------------------------------------------------------


def test_loop_stops_when_a_block_repeats_at_the_tail() -> None:
    block = "so 2+2=4, let me recompute.\n"
    policy = LoopPolicy(repeats=4)
    # The text before the loop ends in "<think>", which no rotation of the block ends in, so the
    # fourth copy completes exactly on the last character.
    decisions = feed_texts(policy, prefixes("<think>" + block * 4))
    assert decisions[-1] == stop("loop")
    assert set(decisions[:-1]) == {C}, "stopped before the fourth copy was complete"


def test_loop_detects_a_loop_that_started_mid_block() -> None:
    # "\n" + block * 3 + block[:-1] is four copies of the block rotated by one character.
    block = "so 2+2=4, let me recompute.\n"
    assert LoopPolicy(repeats=4).on_tokens(thinking(9, "<think>\n" + block * 3 + block[:-1])) == stop("loop")


def test_loop_ignores_the_answer_phase() -> None:
    assert LoopPolicy().on_tokens(answering("ok. " * 20)) == C


@pytest.mark.parametrize(
    ("text", "repeats"),
    [
        pytest.param(BUNDLED_REASONING, 4, id="bundled-model-reasoning-repeats-4"),
        pytest.param(BUNDLED_REASONING, 2, id="bundled-model-reasoning-repeats-2"),
        pytest.param("29+0=29\n29+0=29\n", 4, id="one-line-twice-repeats-4"),
        pytest.param("29+0=29\n29+0=29\n29+0=29\n", 4, id="one-line-three-times-repeats-4"),
    ],
)
def test_loop_has_no_false_positive_on_bundled_model_text(text: str, repeats: int) -> None:
    assert set(feed_texts(LoopPolicy(repeats=repeats), prefixes(text))) == {C}


@pytest.mark.parametrize(
    ("copies", "expected"),
    [pytest.param(2, C, id="two-copies"), pytest.param(3, stop("loop"), id="three-copies")],
)
def test_loop_needs_exactly_repeats_copies(copies: int, expected: Decision) -> None:
    assert LoopPolicy(repeats=3).on_tokens(thinking(9, "intro " + "abcdef\n" * copies)) == expected


@pytest.mark.parametrize(
    ("text", "min_period", "max_period", "repeats", "expected"),
    [
        pytest.param("", 4, 200, 4, False, id="empty"),
        pytest.param("abcd" * 4, 4, 200, 4, True, id="exact-four-copies"),
        pytest.param("abcd" * 3, 4, 200, 4, False, id="three-copies-of-four"),
        pytest.param("xyz" + "abcd" * 4, 4, 200, 4, True, id="prefix-before-loop"),
        pytest.param("abcd" * 4 + "a", 4, 200, 4, True, id="rotated-block-still-detected"),
        pytest.param("abcd" * 4 + "x", 4, 200, 4, False, id="loop-broken-at-tail"),
        pytest.param("ab" * 8, 4, 200, 4, True, id="short-period-found-as-multiple"),
        pytest.param("ab" * 8, 5, 200, 4, False, id="too-short-for-min-period"),
        pytest.param("abcdefgh" * 4, 4, 7, 4, False, id="block-longer-than-max-period"),
        pytest.param("abcdefgh" * 4, 4, 8, 4, True, id="block-at-max-period"),
        pytest.param("29+0=29\n29+0=29\n", 4, 200, 2, True, id="two-lines-with-repeats-2"),
    ],
)
def test_is_looping(text: str, min_period: int, max_period: int, repeats: int, expected: bool) -> None:
    assert is_looping(text, min_period, max_period, repeats) is expected


@pytest.mark.parametrize(
    ("params", "name"),
    [
        pytest.param({"min_period": 0}, "min_period", id="min-period-zero"),
        pytest.param({"min_period": 10, "max_period": 5}, "max_period", id="min-above-max"),
        pytest.param({"repeats": 1}, "repeats", id="repeats-one"),
    ],
)
def test_loop_refuses_out_of_range_params(params: dict[str, Any], name: str) -> None:
    with pytest.raises(PolicyError, match=name):
        LoopPolicy(**params)


# -- static and none -------------------------------------------------------


@pytest.mark.parametrize("policy", [StaticPolicy(64), NoPolicy()], ids=["static", "none"])
def test_baseline_policies_never_stop_or_probe(policy: StopPolicy) -> None:
    events = [thinking(n, "#### 42\n" + "ab" * 40) for n in (1, 64, 10_000)] + [answering("#### 42\n")]
    assert [policy.on_tokens(e) for e in events] == [C] * 4
    assert policy.on_probe(probe(64, "42", logprobs=(0.0,))) == C
    assert policy.wants_logprobs is False


def test_static_passes_thinking_token_budget_to_the_engine() -> None:
    assert StaticPolicy(128).engine_params == {"thinking_token_budget": 128}
    assert StaticPolicy(0).engine_params == {"thinking_token_budget": 0}


def test_static_refuses_negative_budget() -> None:
    with pytest.raises(PolicyError, match="^thinking_token_budget: "):
        StaticPolicy(-1)


# -- compose.Bounded -------------------------------------------------------


def test_bounded_budget_wins_over_inner_stop() -> None:
    policy = Bounded(BudgetPolicy(10), MarkerPolicy(GSM8K_MARKER))
    assert policy.on_tokens(thinking(10, "#### 42\n")) == stop("budget")


def test_bounded_budget_wins_over_inner_probe() -> None:
    policy = Bounded(BudgetPolicy(10), ConvergencePolicy(probe_every=5))
    assert feed_tokens(policy, [5, 9, 10]) == [P, C, stop("budget")]


def test_bounded_passes_inner_decisions_through_below_budget() -> None:
    policy = Bounded(BudgetPolicy(100), ConvergencePolicy(probe_every=8, window=2))
    assert feed_tokens(policy, [8, 12]) == [P, C]
    assert feed_probes(policy, [probe(8, "3"), probe(16, "3")]) == [C, CONVERGED]
    assert Bounded(BudgetPolicy(100), MarkerPolicy(GSM8K_MARKER)).on_tokens(thinking(5, "#### 3\n")) == stop(
        "answer_complete"
    )


def test_bounded_budget_does_not_stop_the_answer_phase() -> None:
    assert Bounded(BudgetPolicy(10), NoPolicy()).on_tokens(answering("42", thinking_tokens=50)) == C


@pytest.mark.parametrize(
    ("inner", "name", "wants_logprobs"),
    [
        pytest.param(ConfidencePolicy(), "confidence", True, id="confidence"),
        pytest.param(ConvergencePolicy(), "convergence", False, id="convergence"),
        pytest.param(NoPolicy(), "none", False, id="none"),
    ],
)
def test_bounded_takes_name_and_wants_logprobs_from_inner(inner: StopPolicy, name: str, wants_logprobs: bool) -> None:
    policy = Bounded(BudgetPolicy(10), inner)
    assert (policy.name, policy.wants_logprobs) == (name, wants_logprobs)


# -- ensemble --------------------------------------------------------------


@pytest.mark.parametrize(
    ("leader", "runner_up", "value"),
    [
        pytest.param(0, 0, 0.5, id="0-0"),
        pytest.param(1, 0, 0.75, id="1-0"),
        pytest.param(2, 0, 0.875, id="2-0"),
        pytest.param(3, 0, 15 / 16, id="3-0"),
        pytest.param(4, 0, 31 / 32, id="4-0"),
        pytest.param(1, 1, 0.5, id="1-1"),
        # n = 4: (C(4,0) + C(4,1) + C(4,2)) / 2^4 = (1 + 4 + 6) / 16
        pytest.param(2, 1, 11 / 16, id="2-1"),
        # n = 5: (1 + 5 + 10 + 10) / 32
        pytest.param(3, 1, 26 / 32, id="3-1"),
        # n = 7: (128 - C(7,6) - C(7,7)) / 128
        pytest.param(5, 1, 120 / 128, id="5-1"),
    ],
)
def test_leader_posterior_exact_values(leader: int, runner_up: int, value: float) -> None:
    assert leader_posterior(leader, runner_up) == value


def test_leader_posterior_grows_with_leader_count_and_is_symmetric() -> None:
    for runner_up in range(6):
        values = [leader_posterior(leader, runner_up) for leader in range(runner_up, 25)]
        assert all(a < b for a, b in zip(values, values[1:], strict=False)), runner_up
        assert all(0.0 < v < 1.0 for v in values)
        for leader in range(25):
            # P(X > 1/2) + P(X < 1/2) = 1, and Beta(b+1, a+1) is Beta(a+1, b+1) mirrored about 1/2.
            assert leader_posterior(leader, runner_up) + leader_posterior(runner_up, leader) == 1.0


@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        pytest.param([], (None, 0, 0), id="no-answers"),
        pytest.param([None, None], (None, 0, 0), id="only-none"),
        pytest.param(["x"], ("x", 1, 0), id="single"),
        pytest.param(["a", "b"], ("a", 1, 1), id="tie-goes-to-first-seen"),
        pytest.param(["b", "a"], ("b", 1, 1), id="tie-goes-to-first-seen-reversed"),
        pytest.param(["a", "b", "b", "a"], ("a", 2, 2), id="two-two-tie"),
        pytest.param([None, "b", "a", "a", "b"], ("b", 2, 2), id="none-before-tie-is-not-first"),
        pytest.param(["a", None, None, "b", "b"], ("b", 2, 1), id="none-does-not-vote"),
        pytest.param(["a", "b", "c", "c"], ("c", 2, 1), id="runner-up-is-second-count"),
    ],
)
def test_majority(answers: list[str | None], expected: tuple[str | None, int, int]) -> None:
    assert majority(answers) == expected


@pytest.mark.parametrize(
    ("params", "answers", "expected"),
    [
        pytest.param(EnsembleParams(), ["7", "7"], Verdict(True, "7", "unanimous"), id="unanimous-first-wave"),
        pytest.param(
            EnsembleParams(wave=3), ["7", "7", "7"], Verdict(True, "7", "unanimous"), id="unanimous-wave-of-3"
        ),
        pytest.param(EnsembleParams(), ["7", "8"], Verdict(False, "7", "drawing", 2), id="split-first-wave-draws"),
        pytest.param(EnsembleParams(), ["7", None], Verdict(False, "7", "drawing", 2), id="none-is-not-unanimous"),
        pytest.param(EnsembleParams(), [None, None], Verdict(False, None, "drawing", 2), id="no-answers-yet"),
        pytest.param(
            EnsembleParams(), ["7", "7", "8", "8"], Verdict(False, "7", "drawing", 2), id="unanimity-only-on-first-wave"
        ),
        pytest.param(
            EnsembleParams(), ["7", "8", "7", "7"], Verdict(False, "7", "drawing", 2), id="posterior-0.8125-below-0.95"
        ),
        pytest.param(
            EnsembleParams(confidence=0.8),
            ["7", "8", "7", "7"],
            Verdict(True, "7", "posterior"),
            id="posterior-0.8125-reaches-0.8",
        ),
        pytest.param(
            EnsembleParams(max_samples=10),
            [None, "7", "7", "7", "7", "7"],
            Verdict(True, "7", "posterior"),
            id="posterior-5-0-reaches-0.95",
        ),
        pytest.param(
            EnsembleParams(max_samples=4),
            ["1", "2", "3", "4"],
            Verdict(True, "1", "max_samples"),
            id="max-samples-stops-with-first-seen",
        ),
        pytest.param(
            EnsembleParams(max_samples=4),
            [None, None, None, None],
            Verdict(True, None, "max_samples"),
            id="max-samples-with-no-answer",
        ),
        pytest.param(
            EnsembleParams(wave=3, max_samples=5),
            ["1", "2", "3"],
            Verdict(False, "1", "drawing", 2),
            id="last-wave-is-cut-to-remaining",
        ),
    ],
)
def test_judge(params: EnsembleParams, answers: list[str | None], expected: Verdict) -> None:
    assert judge(answers, params) == expected


@pytest.mark.parametrize("seed", range(30), ids=lambda s: f"seed-{s}")
def test_judge_never_draws_past_max_samples_random(seed: int) -> None:
    rng = random.Random(seed)
    wave = rng.randint(1, 4)
    params = EnsembleParams(
        wave=wave, max_samples=rng.randint(wave, 12), confidence=rng.choice([0.6, 0.8, 0.9, 0.95, 0.99])
    )
    pools: list[list[str | None]] = [["1"], ["1", "2"], ["1", "2", "3", None]]
    pool = rng.choice(pools)
    answers = [rng.choice(pool) for _ in range(params.wave)]
    while True:
        verdict = judge(answers, params)
        assert verdict.answer == majority(answers)[0]
        if verdict.done:
            assert verdict.next_wave == 0
            break
        assert 1 <= verdict.next_wave <= min(params.wave, params.max_samples - len(answers))
        answers += [rng.choice(pool) for _ in range(verdict.next_wave)]
    assert len(answers) <= params.max_samples


@pytest.mark.parametrize(
    ("params", "name"),
    [
        pytest.param({"wave": 0}, "wave", id="wave-zero"),
        pytest.param({"wave": 4, "max_samples": 3}, "max_samples", id="max-samples-below-wave"),
        pytest.param({"confidence": 0.5}, "confidence", id="confidence-one-half"),
        pytest.param({"confidence": 1.0}, "confidence", id="confidence-one"),
        pytest.param({"confidence": 0.2}, "confidence", id="confidence-below-half"),
        pytest.param({"inner": "ensemble"}, "inner", id="nested-ensemble"),
        pytest.param({"temperature": 2.5}, "temperature", id="temperature-too-high"),
    ],
)
def test_ensemble_params_refuse_bad_values(params: dict[str, Any], name: str) -> None:
    with pytest.raises(PolicyError, match=f"^{name}: "):
        EnsembleParams(**params)


# -- registry --------------------------------------------------------------


def test_registry_unknown_policy_lists_known_names() -> None:
    with pytest.raises(PolicyError, match="unknown policy 'dynasor'") as info:
        build_policy("dynasor", {}, budget=100)
    for name in NAMES:
        assert name in str(info.value)


def test_registry_ensemble_is_not_a_stream_policy() -> None:
    with pytest.raises(PolicyError, match="ensemble_params"):
        build_policy("ensemble", {}, budget=100)


@pytest.mark.parametrize(
    ("name", "params", "bad"),
    [
        pytest.param("convergence", {"windw": 3}, "windw", id="typo"),
        pytest.param("none", {"window": 3}, "window", id="param-of-another-policy"),
        pytest.param("convergence", {"name": "x"}, "name", id="non-init-field"),
        pytest.param("convergence", {"_answers": []}, "_answers", id="private-field"),
    ],
)
def test_registry_unknown_parameter_is_named(name: str, params: dict[str, Any], bad: str) -> None:
    with pytest.raises(PolicyError, match=f"policy '{name}' has no parameter '{bad}'"):
        build_policy(name, params, budget=100)


@pytest.mark.parametrize(
    ("name", "params", "bad"),
    [
        pytest.param("convergence", {"window": "3"}, "window", id="str-for-int"),
        pytest.param("convergence", {"window": True}, "window", id="bool-for-int"),
        pytest.param("convergence", {"window": 3.0}, "window", id="float-for-int"),
        pytest.param("confidence", {"threshold": True}, "threshold", id="bool-for-float"),
        pytest.param("confidence", {"threshold": "0.9"}, "threshold", id="str-for-float"),
        pytest.param("confidence", {"aggregate": 1}, "aggregate", id="int-for-str"),
        pytest.param("marker", {"pattern": None}, "pattern", id="none-for-str"),
        pytest.param("convergence", {"hesitation_words": "wait"}, "hesitation_words", id="str-for-tuple"),
        pytest.param("convergence", {"hesitation_words": ["wait", 1]}, "hesitation_words", id="int-in-tuple"),
    ],
)
def test_registry_wrong_type_is_named(name: str, params: dict[str, Any], bad: str) -> None:
    with pytest.raises(PolicyError, match=f"policy '{name}' parameter '{bad}': expected "):
        build_policy(name, params, budget=100)


@pytest.mark.parametrize(
    ("name", "params", "bad"),
    [
        pytest.param("convergence", {"window": 0}, "window", id="convergence-window"),
        pytest.param("convergence", {"min_tokens": -1}, "min_tokens", id="convergence-min-tokens"),
        pytest.param("confidence", {"threshold": 1.5}, "threshold", id="confidence-threshold"),
        pytest.param("confidence", {"min_tokens": -1}, "min_tokens", id="confidence-min-tokens"),
        pytest.param("confidence", {"aggregate": "median"}, "aggregate", id="confidence-aggregate"),
        pytest.param("loop", {"repeats": 1}, "repeats", id="loop-repeats"),
        pytest.param("marker", {"pattern": "("}, "pattern", id="marker-pattern"),
        pytest.param("static", {"thinking_token_budget": -1}, "thinking_token_budget", id="static-budget"),
    ],
)
def test_registry_out_of_range_value_names_the_parameter(name: str, params: dict[str, Any], bad: str) -> None:
    with pytest.raises(PolicyError, match=f"policy '{name}' parameter {bad}: "):
        build_policy(name, params, budget=100)


@pytest.mark.parametrize(
    ("name", "missing"),
    [pytest.param("static", "thinking_token_budget", id="static"), pytest.param("marker", "pattern", id="marker")],
)
def test_registry_missing_required_parameter_is_named(name: str, missing: str) -> None:
    with pytest.raises(PolicyError, match=missing):
        build_policy(name, {}, budget=100)


REQUIRED: dict[str, dict[str, Any]] = {
    "marker": {"pattern": GSM8K_MARKER},
    "static": {"thinking_token_budget": 8},
    "cue": {"cues": ["\ncheck\n"]},
}


@pytest.mark.parametrize("name", sorted(STREAM_POLICIES))
def test_build_policy_returns_a_bounded_policy_whose_budget_applies(name: str) -> None:
    policy = build_policy(name, REQUIRED.get(name, {}), budget=50)
    assert isinstance(policy, Bounded)
    assert policy.budget.budget == 50
    assert policy.on_tokens(thinking(50, "")) == stop("budget")


def test_build_policy_accepts_a_list_for_a_tuple_and_an_int_for_a_float() -> None:
    policy = build_policy("convergence", {"hesitation_words": ["Perhaps"], "window": 2}, budget=100)
    assert isinstance(policy, Bounded) and isinstance(policy.inner, ConvergencePolicy)
    assert policy.inner.hesitation_words == ("perhaps",)
    assert policy.inner.window == 2
    confident = build_policy("confidence", {"threshold": 1}, budget=100)
    assert isinstance(confident, Bounded) and isinstance(confident.inner, ConfidencePolicy)
    assert confident.inner.threshold == 1
    assert confident.wants_logprobs is True


def test_build_policy_refuses_a_budget_below_one() -> None:
    with pytest.raises(PolicyError, match="budget"):
        build_policy("none", {}, budget=0)


def test_ensemble_params_returns_plan_and_inner_params() -> None:
    plan, inner = ensemble_params(
        {"wave": 3, "max_samples": 9, "confidence": 0.9, "inner": "convergence", "inner_params": {"window": 2}}
    )
    assert plan == EnsembleParams(wave=3, max_samples=9, confidence=0.9, inner="convergence")
    assert inner == {"window": 2}
    assert ensemble_params({}) == (EnsembleParams(), {})


@pytest.mark.parametrize(
    ("params", "message"),
    [
        pytest.param({"inner": "convergence", "inner_params": {"window": 0}}, "parameter window", id="inner-bad-value"),
        pytest.param({"inner": "convergence", "inner_params": {"windw": 2}}, "'windw'", id="inner-unknown-param"),
        pytest.param({"inner": "marker"}, "pattern", id="inner-missing-required"),
        pytest.param({"inner": "dynasor"}, "unknown policy 'dynasor'", id="inner-unknown-policy"),
        pytest.param({"inner": "ensemble"}, "parameter inner", id="nested-ensemble"),
        pytest.param({"inner_params": [1]}, "'inner_params'", id="inner-params-not-mapping"),
        pytest.param({"wave": "2"}, "'wave'", id="wave-wrong-type"),
        pytest.param({"wave": 0}, "parameter wave", id="wave-out-of-range"),
        pytest.param({"waves": 2}, "'waves'", id="unknown-plan-param"),
    ],
)
def test_ensemble_params_validates_plan_and_inner_policy(params: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        ensemble_params(params)


def test_validate_checks_both_stream_policies_and_ensembles() -> None:
    validate("convergence", {"window": 2}, budget=10)
    validate("ensemble", {"inner": "loop", "inner_params": {"repeats": 3}}, budget=10)
    with pytest.raises(PolicyError, match="window"):
        validate("convergence", {"window": 0})
    with pytest.raises(PolicyError, match="repeats"):
        validate("ensemble", {"inner": "loop", "inner_params": {"repeats": 1}})


def test_convergence_with_a_step_delimiter_probes_only_at_step_ends() -> None:
    from policies.base import Action, TokenEvent
    from policies.convergence import ConvergencePolicy

    policy = ConvergencePolicy(probe_every=4, window=2, step_delimiter="\n")
    pieces = list("1+2=3\n3+4=7\n7+0=7\n")
    actions = []
    for i, piece in enumerate(pieces, start=1):
        event = TokenEvent("thinking", piece, 1, i, "".join(pieces[:i]))
        actions.append(policy.on_tokens(event).action)
    probe_at = [i for i, a in enumerate(actions, start=1) if a is Action.PROBE]
    assert probe_at == [6, 12, 18]  # each at a newline, at least 4 tokens after the last probe


# -- what a policy asks of the engine (engine_params, engine_logprobs) ------


@pytest.mark.parametrize("name", sorted(STREAM_POLICIES))
def test_every_policy_says_what_it_asks_of_the_engine(name: str) -> None:
    params: dict[str, Any] = {"thinking_token_budget": 8} if name == "static" else {}
    if name == "marker":
        params = {"pattern": "#### done"}
    if name == "cue":
        params = {"cues": ["\ncheck\n"]}
    policy = build_policy(name, params, budget=64)
    asked = {
        "static": {"thinking_token_budget": 8},
        "marker": {"stop": ["#### done"], "include_stop_str_in_output": True},
        "cue": {"stop": ["\ncheck\n"], "include_stop_str_in_output": True},
    }
    assert dict(policy.engine_params) == asked.get(name, {})
    assert policy.engine_logprobs == (5 if name == "brake" else 0)


def test_bounded_asks_the_engine_what_its_inner_policy_asks() -> None:
    from policies.brake import BrakePolicy

    budget = BudgetPolicy(16)
    assert Bounded(budget, StaticPolicy(32)).engine_params == {"thinking_token_budget": 32}
    assert Bounded(budget, BrakePolicy(top_logprobs=7)).engine_logprobs == 7
    assert Bounded(budget, NoPolicy()).engine_params == {} and Bounded(budget, NoPolicy()).engine_logprobs == 0


def test_a_policy_that_asks_nothing_gets_its_own_empty_params() -> None:
    first, second = NoPolicy(), LoopPolicy()
    assert first.engine_params == {} and first.engine_params is not second.engine_params
