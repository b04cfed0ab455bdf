"""Exact match (EM): answer extractors, normalisers and the score itself.

Everything here is a pure function of its arguments, so the sampler, the
evaluation scripts and the tests all score answers the same way.

An *extractor* pulls the final answer out of a model's output and returns
``None`` when there is none. A *normaliser* maps an answer to a canonical
string, so that ``"1,234"`` and ``"1234.0"`` compare equal. ``exact_match``
extracts from the prediction, normalises both sides and compares; it never
raises on model output, because a model that writes no answer is simply wrong.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence

Extractor = Callable[[str], str | None]
Normalizer = Callable[[str], str]

__all__ = [
    "EXTRACTORS",
    "NORMALIZERS",
    "Extractor",
    "Normalizer",
    "RegexExtractor",
    "exact_match",
    "extract_boxed",
    "extract_gsm8k",
    "extract_last_number",
    "get_extractor",
    "get_normalizer",
    "normalize_exact",
    "normalize_number",
    "normalize_text",
]

# --- normalisers -------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
# Dashes that people and models write for a minus sign.
_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\u2012": "-", "\u2013": "-", "\ufe63": "-", "\uff0d": "-"})
# Optional sign, then digits either grouped in thousands ("12,345") or plain,
# then an optional fraction; "12." (a sentence's full stop) is allowed.
_NUMBER = re.compile(r"([+-]?)(\d{1,3}(?:,\d{3})+|\d+|(?=\.\d))(?:\.(\d*))?")


def normalize_text(text: str) -> str:
    """SQuAD-style: lowercase, drop punctuation and articles, collapse whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def normalize_number(text: str) -> str:
    """Canonical decimal form of a number, or ``normalize_text(text)`` if it is not one.

    ``"1,234"``, ``"+1234"``, ``"1234."`` and ``"1234.00"`` all become ``"1234"``;
    ``"\u22125"`` (unicode minus) becomes ``"-5"``; ``"0.50"`` becomes ``"0.5"``.
    Text that becomes a number once normalised (``"00:"``) is that number, so
    normalising twice changes nothing.
    """
    number = _canonical_number(text)
    if number is not None:
        return number
    plain = normalize_text(text)
    return _canonical_number(plain) or plain


def _canonical_number(text: str) -> str | None:
    match = _NUMBER.fullmatch(text.strip().translate(_MINUS_SIGNS))
    if match is None:
        return None
    sign, whole, fraction = match.group(1), match.group(2), match.group(3) or ""
    whole = whole.replace(",", "").lstrip("0") or "0"
    fraction = fraction.rstrip("0")
    canonical = f"{whole}.{fraction}" if fraction else whole
    if sign == "-" and canonical != "0":
        canonical = "-" + canonical
    return canonical


def normalize_exact(text: str) -> str:
    """Only surrounding whitespace is ignored; everything else must match."""
    return text.strip()


NORMALIZERS: dict[str, Normalizer] = {
    "number": normalize_number,
    "text": normalize_text,
    "exact": normalize_exact,
}


def get_normalizer(name: str) -> Normalizer:
    """The normaliser registered as ``name``; ValueError names the valid ones."""
    try:
        return NORMALIZERS[name]
    except KeyError:
        valid = ", ".join(sorted(NORMALIZERS))
        raise ValueError(f"unknown normalizer {name!r}; valid names: {valid}") from None


# --- extractors ----------------------------------------------------------------

_GSM8K_LINE = re.compile(r"^[ \t]*####[ \t]*(.*?)[ \t]*$", re.MULTILINE)
_BOXED_OPEN = "\\boxed{"
# Signs include the unicode minus; thousands groups and a fraction are kept
# whole so that the normaliser sees the number as written.
_ANY_NUMBER = re.compile(r"(?<!\d)[-+\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\d)")


def extract_gsm8k(text: str) -> str | None:
    """The text after ``####`` on the last line that starts with it (GSM8K style)."""
    answers = [m.group(1).strip() for m in _GSM8K_LINE.finditer(text)]
    if not answers or not answers[-1]:
        return None
    return answers[-1]


def _balanced(text: str, start: int) -> int | None:
    """Index of the ``}`` that closes the brace opened just before ``start``."""
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def extract_boxed(text: str) -> str | None:
    """Contents of the last complete ``\\boxed{...}``, nested braces included.

    A box inside a box (``\\boxed{\\boxed{5}}``) yields the innermost contents.
    An unclosed box, as left by a truncated generation, is ignored.
    """
    found: str | None = None
    pos = text.find(_BOXED_OPEN)
    while pos != -1:
        start = pos + len(_BOXED_OPEN)
        end = _balanced(text, start)
        if end is None:
            break
        found = text[start:end]
        pos = text.find(_BOXED_OPEN, end + 1)
    while found is not None and found.strip().startswith(_BOXED_OPEN) and found.strip().endswith("}"):
        inner = found.strip()
        if _balanced(inner, len(_BOXED_OPEN)) != len(inner) - 1:
            break
        found = inner[len(_BOXED_OPEN) : -1]
    if found is None or not found.strip():
        return None
    return found.strip()


def extract_last_number(text: str) -> str | None:
    """The last number in the text, with its sign, thousands separators and fraction."""
    last: str | None = None
    for match in _ANY_NUMBER.finditer(text):
        last = match.group(0)
    return last


class RegexExtractor:
    """Extract with a configured regular expression, compiled once.

    The answer is the first capture group of the *last* match (the whole match
    if the pattern has no groups), so it agrees with the other extractors,
    which all take the final answer a model states.
    """

    def __init__(self, pattern: str, flags: int = 0) -> None:
        try:
            self._regex = re.compile(pattern, flags)
        except re.error as exc:
            raise ValueError(f"invalid extractor regex {pattern!r}: {exc}") from exc
        self.pattern = pattern

    def __call__(self, text: str) -> str | None:
        last: re.Match[str] | None = None
        for match in self._regex.finditer(text):
            last = match
        if last is None:
            return None
        value = last.group(1) if self._regex.groups else last.group(0)
        if value is None or not value.strip():
            return None
        return value.strip()

    def __repr__(self) -> str:
        return f"RegexExtractor({self.pattern!r})"


EXTRACTORS: dict[str, Extractor] = {
    "gsm8k": extract_gsm8k,
    "boxed": extract_boxed,
    "last_number": extract_last_number,
}
_REGEX = "regex"


def get_extractor(name: str, pattern: str | None = None) -> Extractor:
    """The extractor registered as ``name``; ``"regex"`` needs ``pattern``.

    Raises ValueError for an unknown name (listing the valid ones), for a
    missing or invalid regex pattern, and for a pattern given to an extractor
    that takes none (so a config typo does not silently change scoring).
    """
    if name == _REGEX:
        if pattern is None:
            raise ValueError("extractor 'regex' needs a pattern")
        return RegexExtractor(pattern)
    if name not in EXTRACTORS:
        valid = ", ".join(sorted([*EXTRACTORS, _REGEX]))
        raise ValueError(f"unknown extractor {name!r}; valid names: {valid}")
    if pattern is not None:
        raise ValueError(f"extractor {name!r} takes no pattern (only 'regex' does)")
    return EXTRACTORS[name]


# --- the score -------------------------------------------------------------------


def exact_match(
    prediction: str,
    golds: Sequence[str],
    extractor: Extractor = extract_gsm8k,
    normalizer: Normalizer = normalize_number,
) -> float:
    """1.0 if the answer extracted from ``prediction`` equals any gold, else 0.0.

    Golds are reference answers, so they are normalised but not extracted. A
    prediction with no extractable answer, or one that normalises to nothing,
    scores 0.0. An empty ``golds`` is a caller bug and raises ValueError.
    """
    if isinstance(golds, str) or not golds:
        raise ValueError("golds must be a non-empty sequence of answer strings")
    answer = extractor(prediction)
    if answer is None:
        return 0.0
    predicted = normalizer(answer)
    if not predicted:
        return 0.0
    return 1.0 if any(predicted == normalizer(gold) for gold in golds) else 0.0
