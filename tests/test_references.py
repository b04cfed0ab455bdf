"""Reference sets: validation of whole JSONL files, all or nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.evaluation import (
    ReferenceItem,
    ReferenceSet,
    ReferenceSetError,
    load_reference_file,
    parse_reference_lines,
)

REFERENCES = Path(__file__).resolve().parent.parent / "references"
GOOD = {"id": "x-1", "prompt": "Q: 1+2=?\n", "answers": ["3"], "route": "arith", "difficulty": 1}


def jsonl(*objects: object) -> str:
    return "".join(json.dumps(o) + "\n" for o in objects)


def item(**changes: object) -> dict[str, object]:
    out: dict[str, object] = {**GOOD, **changes}
    return {k: v for k, v in out.items() if v is not None}


def without(key: str) -> dict[str, object]:
    return {k: v for k, v in GOOD.items() if k != key}


def test_parse_loads_valid_items_in_order_with_lookup_by_id() -> None:
    text = jsonl(item(id="a"), item(id="b", answers=["3", "three"], meta={"operands": 2}))
    refs = parse_reference_lines("demo", text)
    assert refs.name == "demo"
    assert [i.id for i in refs] == ["a", "b"]
    assert len(refs) == 2
    assert refs["b"].answers == ("3", "three")
    assert refs.get("b") is refs.items[1]
    assert refs.get("missing") is None
    assert "a" in refs and "missing" not in refs


def test_parse_accepts_messages_instead_of_prompt() -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+2?"}]
    refs = parse_reference_lines("chat", jsonl(item(prompt=None, messages=messages)))
    only = refs.items[0]
    assert only.prompt is None
    assert only.messages is not None
    assert [m.role for m in only.messages] == ["system", "user"]


@pytest.mark.parametrize("difficulty", [3, "hard"])
def test_parse_accepts_int_or_str_difficulty(difficulty: int | str) -> None:
    refs = parse_reference_lines("d", jsonl(item(difficulty=difficulty)))
    assert refs.items[0].difficulty == difficulty


def test_parse_skips_blank_lines_but_counts_them() -> None:
    text = "\n" + json.dumps(item(id="a")) + "\n\n   \n" + json.dumps(item(id="b", answers=[]))
    with pytest.raises(ReferenceSetError) as info:
        parse_reference_lines("x", text)
    assert str(info.value) == "x line 5: field 'answers': must not be empty"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (item(answers=[]), "field 'answers': must not be empty"),
        (without("answers"), "field 'answers': is required"),
        (item(answers=["3", ""]), "field 'answers[1]': must not be empty"),
        (item(answers=["  "]), "field 'answers[0]': must not be empty"),
        (item(answers="3"), "field 'answers': must be a list"),
        (item(answers=[3]), "field 'answers[0]': must be a string"),
        (item(id=""), "field 'id': must not be empty"),
        (item(id=7), "field 'id': must be a string"),
        (without("route"), "field 'route': is required"),
        (item(difficulty=1.5), "field 'difficulty': must be an integer or a string"),
        (item(difficulty=True), "field 'difficulty': must be an integer or a string"),
        (item(meta=[1]), "field 'meta': must be an object"),
        (item(answer="3"), "field 'answer': unknown field"),
        (without("prompt"), "exactly one of 'prompt' or 'messages' must be given"),
        (
            item(messages=[{"role": "user", "content": "hi"}]),
            "exactly one of 'prompt' or 'messages' must be given",
        ),
        (item(prompt=None, messages=[]), "field 'messages': must not be empty"),
        (
            item(prompt=None, messages=[{"role": "bot", "content": "hi"}]),
            "field 'messages[0].role': must be one of 'system', 'user', 'assistant'",
        ),
        (
            item(prompt=None, messages=[{"role": "user", "content": "hi", "name": "x"}]),
            "field 'messages[0].name': unknown field",
        ),
    ],
)
def test_parse_rejects_bad_item_naming_line_and_field(bad: dict[str, object], message: str) -> None:
    text = jsonl(item(id="a"), item(id="b"), bad)
    with pytest.raises(ReferenceSetError) as info:
        parse_reference_lines("refs", text, source="references/x.jsonl")
    assert str(info.value) == f"references/x.jsonl line 3: {message}"
    assert info.value.issues[0].line == 3


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"id": "c",', "invalid JSON: Expecting property name enclosed in double quotes (column 12)"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('"just a string"', "expected a JSON object, got str"),
    ],
)
def test_parse_rejects_lines_that_are_not_json_objects(line: str, message: str) -> None:
    text = jsonl(item(id="a")) + line + "\n"
    with pytest.raises(ReferenceSetError, match=r"^x line 2: ") as info:
        parse_reference_lines("x", text)
    assert str(info.value) == f"x line 2: {message}"


def test_parse_rejects_duplicate_ids_naming_both_lines() -> None:
    text = jsonl(item(id="a"), item(id="b"), item(id="a"))
    with pytest.raises(ReferenceSetError) as info:
        parse_reference_lines("x", text)
    assert str(info.value) == "x line 3: field 'id': duplicate id 'a' (first on line 1)"


@pytest.mark.parametrize("text", ["", "\n", "  \n\n\t\n"])
def test_parse_rejects_blank_file(text: str) -> None:
    with pytest.raises(ReferenceSetError, match=r"^x: no reference items \(the file is blank\)$"):
        parse_reference_lines("x", text)


def test_parse_reports_every_bad_line_and_loads_nothing() -> None:
    text = jsonl(item(id="a"), item(id="b", answers=[]), item(id="c"), without("route"))
    with pytest.raises(ReferenceSetError) as info:
        parse_reference_lines("x", text)
    assert [(i.line, i.field) for i in info.value.issues] == [(2, "answers"), (4, "route")]
    assert str(info.value).splitlines() == [
        "x line 2: field 'answers': must not be empty",
        "x line 4: field 'route': is required",
    ]


def test_parse_caps_the_number_of_problems_in_the_message() -> None:
    text = jsonl(*[item(id=f"i{n}", answers=[]) for n in range(25)])
    with pytest.raises(ReferenceSetError) as info:
        parse_reference_lines("x", text)
    assert len(info.value.issues) == 25
    lines = str(info.value).splitlines()
    assert len(lines) == 21
    assert lines[-1] == "... and 5 more problems"


def test_parse_keeps_line_numbers_when_a_string_holds_a_unicode_line_separator() -> None:
    text = jsonl(item(id="a", prompt="one\u2028two"), item(id="b", answers=[]))
    with pytest.raises(ReferenceSetError, match=r"^x line 2: field 'answers'"):
        parse_reference_lines("x", text)


def test_load_reference_file_names_the_file_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(jsonl(*[item(id=f"i{n}") for n in range(6)], item(id="i6", answers=[])))
    with pytest.raises(ReferenceSetError) as info:
        load_reference_file(path)
    assert str(info.value) == f"{path} line 7: field 'answers': must not be empty"


def test_load_reference_file_reports_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.jsonl"
    with pytest.raises(ReferenceSetError, match=rf"^{path}: cannot read: No such file or directory$"):
        load_reference_file(path)


def test_load_reference_file_rejects_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(jsonl(item()).encode() + b'{"id": "\xe9"}\n')
    with pytest.raises(ReferenceSetError, match=r"latin1.jsonl line 2: not UTF-8 \(byte 9 of the line\)$"):
        load_reference_file(path)


def test_load_reference_file_accepts_utf8_bom(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + jsonl(item()).encode())
    assert load_reference_file(path).name == "bom"


@pytest.mark.parametrize(("split", "count"), [("train", 500), ("dev", 200), ("test", 500)])
def test_load_reference_file_loads_shipped_sets(split: str, count: int) -> None:
    refs = load_reference_file(REFERENCES / f"arith-{split}.jsonl")
    assert refs.name == f"arith-{split}"
    assert len(refs) == count
    assert all(i.route == "arith" and i.prompt is not None and i.answers for i in refs)
    assert {i.difficulty for i in refs} == {1, 2, 3}


def test_reference_item_is_frozen() -> None:
    ref = ReferenceItem.model_validate(GOOD)
    with pytest.raises(ValidationError):
        ref.route = "qa"  # type: ignore[misc]


def test_reference_set_refuses_duplicate_ids_when_built_directly() -> None:
    ref = ReferenceItem.model_validate(GOOD)
    with pytest.raises(ValueError, match="duplicate id 'x-1'"):
        ReferenceSet(name="dup", items=(ref, ref))
