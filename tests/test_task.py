"""The arithmetic task in models/task.py: generator, grammar and documented habits."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from gateway.evaluation import load_reference_file
from models.task import (
    MAX_OPERANDS,
    MIN_OPERANDS,
    SLIP_DIGIT,
    THINK_CLOSE,
    THINK_OPEN,
    Problem,
    answer_if_cut,
    completion,
    generate,
    has_slip,
    parse_prompt,
    sample_problem,
    thinking,
)

REFERENCES = Path(__file__).resolve().parent.parent / "references"
SPLITS = ("train", "dev", "test")

# The grammar of models/task.py's docstring, as regular expressions.
LINE = r"(\d+)\+(\d)=(\d+)(?: wait (\d+))?\n"
COMPLETION = re.compile(
    rf"<think>\n(?P<forward>(?:{LINE})+)(?:check\n(?P<check>(?:{LINE})+)ok (?P<ok>\d+)\n)?"
    r"</think>\n#### (?P<answer>\d+)"
)
PROMPT = re.compile(r"Q: \d(?:\+\d){1,11}=\?\n")


def problems() -> list[Problem]:
    return generate(seed=99, count=400)


def parse_lines(block: str) -> list[tuple[int, int, int, int | None]]:
    """(acc, digit, first value written, corrected value or None) for each line."""
    return [(int(a), int(d), int(v), int(w) if w else None) for a, d, v, w in re.findall(LINE, block)]


def check_running_sums(lines: list[tuple[int, int, int, int | None]], operands: tuple[int, ...]) -> None:
    """Lines add the operands left to right, each slip being corrected to the true sum."""
    acc = operands[0]
    assert len(lines) == len(operands) - 1
    for (a, d, first, corrected), expected_d in zip(lines, operands[1:], strict=True):
        assert (a, d) == (acc, expected_d)
        acc += d
        assert (corrected if corrected is not None else first) == acc


def test_generate_is_deterministic_for_a_seed() -> None:
    assert generate(7, 200) == generate(7, 200)
    assert generate(7, 200) != generate(8, 200)


def test_generate_gives_distinct_problems_and_skips_excluded_prompts() -> None:
    first = generate(7, 50)
    assert len({p.prompt for p in first}) == 50
    excluded = {p.prompt for p in first[:10]}
    again = generate(7, 50, exclude=excluded)
    assert not excluded & {p.prompt for p in again}
    assert again[:40] == first[10:]


def test_sample_problem_stays_within_documented_ranges() -> None:
    rng = random.Random(0)
    sizes = set()
    for _ in range(2000):
        p = sample_problem(rng)
        sizes.add(len(p.operands))
        assert all(0 <= d <= 9 for d in p.operands)
        assert PROMPT.fullmatch(p.prompt)
    assert sizes == set(range(MIN_OPERANDS, MAX_OPERANDS + 1))


def test_completion_follows_grammar_and_ends_with_the_sum() -> None:
    for problem in problems():
        text = completion(problem)
        match = COMPLETION.fullmatch(text)
        assert match, text
        assert problem.answer == sum(problem.operands)
        assert int(match["answer"]) == problem.answer
        assert text.count(THINK_OPEN) == 1 and text.count(THINK_CLOSE) == 1
        assert text == f"{THINK_OPEN}{thinking(problem)}{THINK_CLOSE}\n#### {problem.answer}"
        check_running_sums(parse_lines(match["forward"]), problem.operands)
        if match["check"] is not None:
            check_running_sums(parse_lines(match["check"]), problem.operands[::-1])
            assert int(match["ok"]) == problem.answer


def test_check_pass_written_iff_four_operands_or_first_at_least_five() -> None:
    for problem in problems():
        expected = len(problem.operands) >= 4 or problem.operands[0] >= 5
        assert problem.has_check == expected, problem
        assert ("check\n" in thinking(problem)) == expected, problem


def test_slip_is_the_sum_without_the_carry_then_corrected() -> None:
    assert thinking(Problem((9, 7))) == "\n9+7=6 wait 16\ncheck\n7+9=16\nok 16\n"
    assert thinking(Problem((1, 7))) == "\n1+7=8\n"  # no carry, no slip
    assert thinking(Problem((6, 8))) == "\n6+8=14\ncheck\n8+6=14\nok 14\n"  # carry, but not a 7


def test_slip_only_when_adding_seven_carries() -> None:
    slips = 0
    for problem in problems():
        match = COMPLETION.fullmatch(completion(problem))
        assert match
        lines = parse_lines(match["forward"]) + parse_lines(match["check"] or "")
        for acc, d, first, corrected in lines:
            if d == SLIP_DIGIT and acc % 10 + d >= 10:
                assert (first, corrected) == (acc + d - 10, acc + d), problem
            else:
                assert (first, corrected) == (acc + d, None), problem
        assert has_slip(problem) == any(c is not None for *_, c in lines)
        slips += has_slip(problem)
    assert slips > 0  # the sample exercises the rule


@pytest.mark.parametrize(
    ("prefix", "belief"),
    [
        ("", 9),  # nothing written: the first operand
        ("\n9+7=6 wait 1", 9),  # the slip line's value is not fully written
        ("\n9+7=6 wait 16", 16),
        ("\n9+7=6 wait 16\n16+3=1", 16),
        ("\n9+7=6 wait 16\n16+3=19", 19),  # forward pass done: the total
        ("\n9+7=6 wait 16\n16+3=19\ncheck\n3+7=0", 19),  # a check in progress changes nothing
        ("\n9+7=6 wait 16\n16+3=19\ncheck\n3+7=0 wait 10\n10+9=19\nok 19\n", 19),
    ],
)
def test_answer_if_cut_is_the_last_complete_forward_sum(prefix: str, belief: int) -> None:
    problem = Problem((9, 7, 3))
    assert thinking(problem).startswith(prefix)
    assert answer_if_cut(problem, len(prefix)) == belief


def test_answer_if_cut_is_a_running_sum_that_reaches_the_total_before_any_check() -> None:
    for problem in problems():
        text = thinking(problem)
        running = {sum(problem.operands[: k + 1]) for k in range(len(problem.operands))}
        beliefs = [answer_if_cut(problem, cut) for cut in range(len(text) + 1)]
        assert set(beliefs) <= running, problem
        assert beliefs == sorted(beliefs), problem  # never goes back
        assert beliefs[-1] == problem.answer
        check = text.find("check\n")
        if check != -1:
            assert set(beliefs[check:]) == {problem.answer}, problem


@pytest.mark.parametrize(
    ("operands", "difficulty"),
    [((1, 2), 1), ((1, 2, 3, 4), 1), ((1,) * 5, 2), ((1,) * 8, 2), ((1,) * 9, 3), ((1,) * 12, 3)],
)
def test_difficulty_tiers_follow_operand_count(operands: tuple[int, ...], difficulty: int) -> None:
    assert Problem(operands).difficulty == difficulty


def test_parse_prompt_inverts_prompt() -> None:
    for p in problems():
        assert parse_prompt(p.prompt) == p


@pytest.mark.parametrize(
    "prompt",
    ["Q: 1+2=?", "1+2=?\n", "Q: 12+3=?\n", "Q: 5=?\n", "Q: " + "+".join("1" * 13) + "=?\n", "Q: a+1=?\n"],
)
def test_parse_prompt_rejects_anything_else(prompt: str) -> None:
    with pytest.raises(ValueError):
        parse_prompt(prompt)


def test_reference_splits_do_not_overlap() -> None:
    sets = {split: load_reference_file(REFERENCES / f"arith-{split}.jsonl") for split in SPLITS}
    prompts = {split: {i.prompt for i in refs} for split, refs in sets.items()}
    ids = {split: {i.id for i in refs} for split, refs in sets.items()}
    for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
        assert not prompts[a] & prompts[b], (a, b)
        assert not ids[a] & ids[b], (a, b)
    for split, refs in sets.items():
        assert len(prompts[split]) == len(refs), f"{split} repeats a prompt"


@pytest.mark.parametrize("split", SPLITS)
def test_reference_items_agree_with_the_task(split: str) -> None:
    for ref in load_reference_file(REFERENCES / f"arith-{split}.jsonl"):
        assert ref.prompt is not None
        problem = parse_prompt(ref.prompt)
        assert ref.answers == (str(sum(problem.operands)),)
        assert ref.difficulty == problem.difficulty
        assert ref.meta == {"operands": len(problem.operands), "check": problem.has_check, "slip": has_slip(problem)}
