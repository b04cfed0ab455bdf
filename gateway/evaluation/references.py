"""Reference sets: JSONL files of prompts with gold answers.

One JSON object per line::

    {"id": "arith-test-0000", "prompt": "Q: 3+3=?\\n", "answers": ["6"],
     "route": "arith", "difficulty": 1, "meta": {"operands": 2}}

``messages`` (a list of ``{"role", "content"}``) may stand in place of
``prompt``; exactly one of the two is given. Unknown fields are rejected, so a
typo such as ``"answer"`` fails loudly instead of loading an item with no gold.

A file loads all or nothing: every line is validated first, and any problem
raises ``ReferenceSetError`` whose message names the file, the 1-based line
and the field, e.g. ``references/x.jsonl line 7: field 'answers': must not be
empty``. Blank lines are skipped but still counted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StrictInt,
    StrictStr,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic_core import ErrorDetails

__all__ = [
    "Message",
    "ReferenceIssue",
    "ReferenceItem",
    "ReferenceSet",
    "ReferenceSetError",
    "load_reference_file",
    "parse_reference_lines",
]

# At most this many problems are spelled out in one error message.
MAX_REPORTED_ISSUES = 20

NonEmptyStr = Annotated[StrictStr, StringConstraints(min_length=1)]
# Not just non-empty: an id or answer of only spaces is a mistake too.
NonBlankStr = Annotated[StrictStr, StringConstraints(min_length=1, pattern=r"\S")]
# An id travels in request ids and headers (a canary's X-Request-Id): a safe character set only (issue 14).
ItemId = Annotated[StrictStr, StringConstraints(pattern=r"^[A-Za-z0-9._:-]{1,128}$")]


class Message(BaseModel):
    """One chat message of a ``messages`` prompt."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: StrictStr


class ReferenceItem(BaseModel):
    """One validated reference item: a prompt and the answers that count as correct."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: ItemId
    prompt: NonEmptyStr | None = None
    messages: Annotated[tuple[Message, ...], Field(min_length=1)] | None = None
    answers: Annotated[tuple[NonBlankStr, ...], Field(min_length=1)]
    route: NonBlankStr
    difficulty: StrictInt | NonBlankStr | None = None
    meta: dict[str, JsonValue] | None = None

    @model_validator(mode="after")
    def _prompt_xor_messages(self) -> ReferenceItem:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of 'prompt' or 'messages' must be given")
        return self


@dataclass(frozen=True)
class ReferenceIssue:
    """One problem found in a reference file; ``field`` is None for whole-line problems."""

    line: int
    field: str | None
    message: str

    def render(self, source: str) -> str:
        where = f"{source} line {self.line}" if self.line else source
        if self.field is None:
            return f"{where}: {self.message}"
        return f"{where}: field '{self.field}': {self.message}"


class ReferenceSetError(ValueError):
    """A reference file is unreadable or has invalid lines; nothing was loaded.

    ``issues`` lists every problem found (the message spells out the first
    ``MAX_REPORTED_ISSUES``), so an upload can be fixed in one round trip.
    """

    def __init__(self, source: str, issues: list[ReferenceIssue]) -> None:
        self.source = source
        self.issues = tuple(issues)
        lines = [issue.render(source) for issue in issues[:MAX_REPORTED_ISSUES]]
        if len(issues) > MAX_REPORTED_ISSUES:
            lines.append(f"... and {len(issues) - MAX_REPORTED_ISSUES} more problems")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class ReferenceSet:
    """A named, ordered set of reference items with lookup by id."""

    name: str
    items: tuple[ReferenceItem, ...]
    source: str = ""
    _by_id: dict[str, ReferenceItem] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_id: dict[str, ReferenceItem] = {}
        for item in self.items:
            if item.id in by_id:
                raise ValueError(f"reference set {self.name!r}: duplicate id {item.id!r}")
            by_id[item.id] = item
        object.__setattr__(self, "_by_id", by_id)

    def get(self, item_id: str) -> ReferenceItem | None:
        return self._by_id.get(item_id)

    def __getitem__(self, item_id: str) -> ReferenceItem:
        return self._by_id[item_id]

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._by_id

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[ReferenceItem]:
        return iter(self.items)


# Plain words for the pydantic errors a hand-written file is likely to hit.
_MESSAGES = {
    "missing": "is required",
    "extra_forbidden": "unknown field",
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "tuple_type": "must be a list",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "literal_error": "must be one of 'system', 'user', 'assistant'",
}


_FIELDS = frozenset(ReferenceItem.model_fields) | frozenset(Message.model_fields)


def _field_path(loc: list[int | str]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else part
    return path


def _describe(error: ErrorDetails) -> str:
    kind = error["type"]
    if kind in ("too_short", "string_too_short", "string_pattern_mismatch"):
        return "must not be empty"
    return _MESSAGES.get(kind, error["msg"])


def _issues_from(line: int, exc: ValidationError) -> list[ReferenceIssue]:
    found: list[tuple[str | None, ErrorDetails]] = []
    for error in exc.errors():
        if error["type"] == "extra_forbidden":
            found.append((_field_path(list(error["loc"])), error))
            continue
        # A union reports one error per member, with the member's name (such
        # as ``int``) in the location: cut the location at the first part
        # that is not a field or an index.
        loc: list[int | str] = []
        for part in error["loc"]:
            if not (isinstance(part, int) or part in _FIELDS):
                break
            loc.append(part)
        found.append((_field_path(loc) or None, error))
    issues: list[ReferenceIssue] = []
    seen: set[str | None] = set()
    for path, error in found:
        nested = any(p is not None and path is not None and p.startswith(path + "[") for p, _ in found)
        if error["type"] == "too_short" and nested:
            continue  # pydantic also calls a list empty when all its items failed
        if error["type"] == "value_error" and path is None:
            message = str(error["ctx"]["error"]) if "ctx" in error else error["msg"]
            issues.append(ReferenceIssue(line, None, message))
            continue
        if path in seen:
            continue  # one problem per field is enough to fix it
        seen.add(path)
        message = _describe(error)
        if path == "difficulty" and error["type"].endswith("_type"):
            message = "must be an integer or a string"
        issues.append(ReferenceIssue(line, path, message))
    return issues


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_reference_lines(name: str, text: str, source: str | None = None) -> ReferenceSet:
    """Validate JSONL ``text`` as the reference set ``name``.

    ``source`` (default: ``name``) is what error messages call the input, such
    as a file path or an upload's filename. Raises ``ReferenceSetError`` if
    any line is invalid, an id repeats, or there are no items at all.
    """
    where = name if source is None else source
    items: list[ReferenceItem] = []
    issues: list[ReferenceIssue] = []
    first_line_of: dict[str, int] = {}
    # Split on "\n" only: str.splitlines() also splits on U+2028 and other
    # separators that may sit unescaped inside a JSON string.
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw, parse_constant=_no_constant)
        except json.JSONDecodeError as exc:
            issues.append(ReferenceIssue(number, None, f"invalid JSON: {exc.msg} (column {exc.colno})"))
            continue
        except (RecursionError, ValueError) as exc:
            issues.append(ReferenceIssue(number, None, f"invalid JSON: {exc}"[:200]))
            continue
        if not isinstance(obj, dict):
            issues.append(ReferenceIssue(number, None, f"expected a JSON object, got {type(obj).__name__}"))
            continue
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            issues.append(ReferenceIssue(number, None, "a lone surrogate (unpaired \\ud800-\\udfff escape)"))
            continue
        try:
            item = ReferenceItem.model_validate(obj)
        except ValidationError as exc:
            issues.extend(_issues_from(number, exc))
            continue
        if item.id in first_line_of:
            first = first_line_of[item.id]
            issues.append(ReferenceIssue(number, "id", f"duplicate id {item.id!r} (first on line {first})"))
            continue
        first_line_of[item.id] = number
        items.append(item)
    if not items and not issues:
        issues.append(ReferenceIssue(0, None, "no reference items (the file is blank)"))
    if issues:
        raise ReferenceSetError(where, issues)
    return ReferenceSet(name=name, items=tuple(items), source=where)


def load_reference_file(path: str | Path) -> ReferenceSet:
    """Load and validate a JSONL reference file; its name is the file's stem.

    Raises ``ReferenceSetError`` naming the file if it cannot be read, is not
    UTF-8, or has any invalid line.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ReferenceSetError(str(path), [ReferenceIssue(0, None, f"cannot read: {exc.strerror}")]) from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        issue = ReferenceIssue(line, None, f"not UTF-8 (byte {column} of the line)")
        raise ReferenceSetError(str(path), [issue]) from exc
    return parse_reference_lines(path.stem, text, source=str(path))
