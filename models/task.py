"""The arithmetic reasoning task that the bundled model is trained on.

Grammar (also in ``models/tinyreason/README.md``)::

    prompt     := "Q: " operand ("+" operand){n-1} "=?" "\\n"      n in 2..12
    operand    := one decimal digit 0..9
    completion := "<think>" "\\n" forward [check] "</think>" "\\n" "#### " sum EOS
    forward    := line{n-1}                 running sums, left to right
    check      := "check\\n" line{n-1} "ok " sum "\\n"
                                            running sums again, right to left
    line       := acc "+" d "=" value "\\n"
                | acc "+" d "=" slip " wait " value "\\n"

Two reasoning-model habits are deterministic functions of the problem, so that
greedy decoding reproduces them (random habits are averaged away by training):

* **Verification.** The check pass is written when ``n >= 4`` or the first
  operand is ``>= 5``. The answer is already known when it starts, so every
  check token is overthinking.
* **Corrected slip.** When the digit added is 7 and the addition carries, the
  line first writes the sum without the carry, then ``wait`` and the right
  value: ``16+7=13 wait 23``.

Difficulty tiers: 1 for 2..4 operands, 2 for 5..8, 3 for 9..12.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
MIN_OPERANDS = 2
MAX_OPERANDS = 12
SLIP_DIGIT = 7


@dataclass(frozen=True)
class Problem:
    operands: tuple[int, ...]

    @property
    def answer(self) -> int:
        return sum(self.operands)

    @property
    def prompt(self) -> str:
        return "Q: " + "+".join(str(d) for d in self.operands) + "=?\n"

    @property
    def difficulty(self) -> int:
        n = len(self.operands)
        return 1 if n <= 4 else 2 if n <= 8 else 3

    @property
    def has_check(self) -> bool:
        return len(self.operands) >= 4 or self.operands[0] >= 5


def _lines(operands: tuple[int, ...]) -> list[str]:
    acc = operands[0]
    out = []
    for d in operands[1:]:
        value = acc + d
        if d == SLIP_DIGIT and (acc % 10) + d >= 10:
            slip = value - 10  # forgot the carry
            out.append(f"{acc}+{d}={slip} wait {value}\n")
        else:
            out.append(f"{acc}+{d}={value}\n")
        acc = value
    return out


def thinking(problem: Problem) -> str:
    """The reasoning between ``<think>`` and ``</think>``, newlines included."""
    text = "\n" + "".join(_lines(problem.operands))
    if problem.has_check:
        text += "check\n" + "".join(_lines(problem.operands[::-1]))
        text += f"ok {problem.answer}\n"
    return text


def completion(problem: Problem) -> str:
    """The full target completion, without the end-of-sequence token."""
    return f"{THINK_OPEN}{thinking(problem)}{THINK_CLOSE}\n#### {problem.answer}"


def answer_if_cut(problem: Problem, cut: int) -> int:
    """The answer the model gives if its reasoning is cut after ``cut`` characters of ``thinking()``.

    Its best belief at that point: the total once the forward pass has
    finished (a check pass in progress does not change a known answer), else
    the running sum of the last complete forward line (the first operand if
    none is complete). Training on these cuts is what makes forced answers and
    probes behave like a reasoning model's: right once the answer is known.
    """
    lines = _lines(problem.operands)
    end = 1  # after the leading newline
    acc = problem.operands[0]
    for d, line in zip(problem.operands[1:], lines, strict=True):
        end += len(line)
        if cut < end - 1:  # this line's final value is not fully written yet
            return acc
        acc += d
    return problem.answer


def has_slip(problem: Problem) -> bool:
    return " wait " in thinking(problem)


def parse_prompt(prompt: str) -> Problem:
    """Inverse of ``Problem.prompt``; raises ValueError on anything else."""
    if not (prompt.startswith("Q: ") and prompt.endswith("=?\n")):
        raise ValueError(f"not a task prompt: {prompt!r}")
    parts = prompt[3:-3].split("+")
    if not all(len(p) == 1 and p.isdigit() for p in parts):
        raise ValueError(f"operands must be single digits: {prompt!r}")
    if not MIN_OPERANDS <= len(parts) <= MAX_OPERANDS:
        raise ValueError(f"need {MIN_OPERANDS}..{MAX_OPERANDS} operands: {prompt!r}")
    return Problem(tuple(int(p) for p in parts))


def sample_problem(rng: random.Random) -> Problem:
    n = rng.randint(MIN_OPERANDS, MAX_OPERANDS)
    return Problem(tuple(rng.randint(0, 9) for _ in range(n)))


def generate(seed: int, count: int, exclude: set[str] | None = None) -> list[Problem]:
    """``count`` distinct problems from ``seed``, skipping prompts in ``exclude``."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    out: list[Problem] = []
    while len(out) < count:
        p = sample_problem(rng)
        if p.prompt in seen:
            continue
        seen.add(p.prompt)
        out.append(p)
    return out
