"""Exact match: normalisers, extractors, registries and the score."""

from __future__ import annotations

import pytest

from gateway.evaluation import (
    RegexExtractor,
    exact_match,
    extract_boxed,
    extract_gsm8k,
    extract_last_number,
    get_extractor,
    get_normalizer,
    normalize_exact,
    normalize_number,
    normalize_text,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1,234", "1234"),
        ("1,234,567", "1234567"),
        ("+42", "42"),
        ("\u22125", "-5"),  # unicode minus
        ("\u22121,234.50", "-1234.5"),
        ("-7", "-7"),
        ("12.", "12"),  # a sentence's full stop
        ("12.0", "12"),
        ("12.00", "12"),
        ("0.50", "0.5"),
        (".5", "0.5"),
        ("007", "7"),
        ("-0", "0"),
        ("  42\n", "42"),
        ("forty two", "forty two"),  # not a number: text normalisation
        ("The Answer!", "answer"),
    ],
)
def test_normalize_number_gives_one_canonical_form(raw: str, expected: str) -> None:
    assert normalize_number(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("The Cat", "cat"),
        ("  a   cat,  an  apple. ", "cat apple"),
        ("Paris!", "paris"),
        ("theatre", "theatre"),  # articles are whole words only
        ("", ""),
    ],
)
def test_normalize_text_is_squad_style(raw: str, expected: str) -> None:
    assert normalize_text(raw) == expected


def test_normalize_exact_ignores_only_surrounding_whitespace() -> None:
    assert normalize_exact("  The Cat\n") == "The Cat"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>\n3+4=7\n</think>\n#### 7", "7"),
        ("#### 5\nthen more\n#### 8", "8"),  # the last #### line wins
        ("####12", "12"),
        ("#### 1,234 \r\n", "1,234"),
        ("the answer is 7", None),  # missing ####
        ("#### 7\n####", None),  # the last #### line is empty
        ("x #### 7", None),  # #### must start the line
        ("", None),
    ],
)
def test_extract_gsm8k_takes_last_hash_line(text: str, expected: str | None) -> None:
    assert extract_gsm8k(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces
        (r"\boxed{1} then \boxed{2}", "2"),  # the last box wins
        (r"\boxed{\boxed{5}}", "5"),  # nested boxes
        (r"\boxed{3} and a truncated \boxed{4", "3"),
        (r"\boxed{}", None),
        ("no box at all", None),
    ],
)
def test_extract_boxed_handles_nesting(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("first 3 then 1,234 apples.", "1,234"),
        ("it is -5.", "-5"),
        ("it is \u22125", "\u22125"),
        ("pi is 3.14", "3.14"),
        ("x2 and y10", "10"),
        ("no digits", None),
    ],
)
def test_extract_last_number_keeps_sign_and_separators(text: str, expected: str | None) -> None:
    assert extract_last_number(text) == expected


@pytest.mark.parametrize(
    ("pattern", "text", "expected"),
    [
        (r"Answer: (\d+)", "Answer: 3\nAnswer: 4", "4"),  # first group of the last match
        (r"\d+", "a 1 b 22", "22"),  # no group: the whole match
        (r"Answer: (\d+)?x", "Answer: x", None),  # the group did not take part
        (r"Answer: (\d+)", "nothing here", None),
    ],
)
def test_regex_extractor_takes_first_group_of_last_match(pattern: str, text: str, expected: str | None) -> None:
    assert RegexExtractor(pattern)(text) == expected


def test_regex_extractor_rejects_invalid_pattern_at_construction() -> None:
    with pytest.raises(ValueError, match=r"invalid extractor regex '\(unclosed'"):
        RegexExtractor("(unclosed")


@pytest.mark.parametrize("name", ["gsm8k", "boxed", "last_number"])
def test_get_extractor_returns_registered_extractors(name: str) -> None:
    assert get_extractor(name)("#### 7\n\\boxed{7} 7") == "7"


def test_get_extractor_builds_regex_extractor_from_pattern() -> None:
    assert get_extractor("regex", r"= (\d+)")("1+1 = 2") == "2"


@pytest.mark.parametrize(
    ("name", "pattern", "message"),
    [
        ("mystery", None, "unknown extractor 'mystery'; valid names: boxed, gsm8k, last_number, regex"),
        ("regex", None, "extractor 'regex' needs a pattern"),
        ("regex", "[", "invalid extractor regex"),
        ("gsm8k", r"\d+", "extractor 'gsm8k' takes no pattern"),
    ],
)
def test_get_extractor_rejects_bad_config(name: str, pattern: str | None, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        get_extractor(name, pattern)


@pytest.mark.parametrize(
    ("name", "normalizer"),
    [("number", normalize_number), ("text", normalize_text), ("exact", normalize_exact)],
)
def test_get_normalizer_returns_registered_normalizers(name: str, normalizer: object) -> None:
    assert get_normalizer(name) is normalizer


def test_get_normalizer_rejects_unknown_name_listing_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown normalizer 'fuzzy'; valid names: exact, number, text"):
        get_normalizer("fuzzy")


@pytest.mark.parametrize(
    ("prediction", "golds", "expected"),
    [
        ("<think>\n2+5=7\n</think>\n#### 7", ["7"], 1.0),
        ("<think>\n2+5=7\n</think>\n#### 8", ["7"], 0.0),
        ("#### 1,234", ["1234"], 1.0),
        ("#### 1234.", ["1,234"], 1.0),  # golds are normalised too
        ("#### \u22125", ["-5"], 1.0),
        ("#### +5", ["5"], 1.0),
        ("#### 12.00", ["12"], 1.0),
        ("#### 12.5", ["12"], 0.0),
        ("#### 9", ["7", "9"], 1.0),  # any gold counts
        ("<think>\n2+5=7\n", ["7"], 0.0),  # truncated, no answer: 0, not an error
        ("", ["7"], 0.0),
        ("#### .", ["0"], 0.0),  # normalises to nothing
    ],
)
def test_exact_match_with_gsm8k_and_number_defaults(prediction: str, golds: list[str], expected: float) -> None:
    assert exact_match(prediction, golds) == expected


@pytest.mark.parametrize(
    ("prediction", "extractor", "normalizer", "golds", "expected"),
    [
        (r"so \boxed{The Eiffel Tower}", "boxed", "text", ["eiffel tower"], 1.0),
        ("it came to 1,000 in the end.", "last_number", "number", ["1000"], 1.0),
        ("The Cat", "gsm8k", "exact", ["The Cat"], 0.0),  # nothing to extract
    ],
)
def test_exact_match_uses_given_extractor_and_normalizer(
    prediction: str, extractor: str, normalizer: str, golds: list[str], expected: float
) -> None:
    score = exact_match(prediction, golds, get_extractor(extractor), get_normalizer(normalizer))
    assert score == expected


def test_exact_match_with_regex_extractor() -> None:
    extractor = get_extractor("regex", r"(?i)final answer:\s*(\S+)")
    assert exact_match("Final answer: 42", ["42"], extractor) == 1.0
    assert exact_match("I give up", ["42"], extractor) == 0.0


@pytest.mark.parametrize("golds", [[], "7"])
def test_exact_match_rejects_missing_golds(golds: list[str] | str) -> None:
    with pytest.raises(ValueError, match="golds must be a non-empty sequence"):
        exact_match("#### 7", golds)
