"""Property-based tests (hypothesis): SSE parsing, EM normalisation, prompt matching and the stop policies."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.evaluation import exact_match, extract_gsm8k, normalize_number, normalize_text
from gateway.evaluation.matching import normalize_prompt, prompt_key
from gateway.openai.sse import SSEDecoder, encode, loads
from policies.base import Action, ProbeResult, TokenEvent
from policies.registry import build_policy

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def split_points(text: str, data: st.DataObject) -> list[str]:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    pieces, last = [], 0
    for cut in cuts:
        pieces.append(text[last:cut])
        last = cut
    pieces.append(text[last:])
    return pieces


# -- SSE ------------------------------------------------------------------------------


@FAST
@given(payloads=st.lists(st.dictionaries(st.text(max_size=10), json_values, max_size=4), max_size=6), data=st.data())
def test_sse_decoding_does_not_depend_on_where_the_bytes_are_split(payloads: list[Any], data: st.DataObject) -> None:
    stream = b"".join(encode(p) for p in payloads).decode()
    ending = data.draw(st.sampled_from(["\n", "\r\n", "\r"]))
    stream = stream.replace("\n", ending)
    decoder = SSEDecoder()
    events: list[bytes] = []
    for piece in split_points(stream, data):
        events.extend(decoder.feed(piece.encode()))
    events.extend(decoder.flush())
    assert [json.loads(e) for e in events] == payloads


@FAST
@given(text=st.text(max_size=200), data=st.data())
def test_sse_decoder_never_raises_on_arbitrary_text(text: str, data: st.DataObject) -> None:
    decoder = SSEDecoder()
    for piece in split_points(text, data):
        decoder.feed(piece.encode())
    decoder.flush()


# -- EM normalisation and matching ---------------------------------------------------------


@FAST
@given(payload=st.dictionaries(st.text(max_size=10), json_values, max_size=4))
def test_sse_encoding_writes_one_compact_json_event_that_reads_back(payload: dict[str, Any]) -> None:
    event = encode(payload)
    assert event.startswith(b"data: ") and event.endswith(b"\n\n") and b"\n" not in event[:-2]
    assert json.loads(event[6:-2]) == payload
    assert event[6:-2] == json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def test_sse_encoding_refuses_what_json_cannot_write_and_escapes_a_lone_surrogate() -> None:
    with pytest.raises(TypeError):
        encode({"x": object()})
    assert encode({"x": "a\ud800"}) == b'data: {"x":"a\\ud800"}\n\n'


def test_sse_payloads_that_only_pythons_json_reads_are_still_read() -> None:
    assert loads(b'{"lp":-Infinity,"x":NaN}')["lp"] == float("-inf")
    assert loads(b' {"a":1} ') == {"a": 1}
    for bad in (b'{"a":1} x', b"\xff", b"{"):
        with pytest.raises(ValueError):
            loads(bad)


@FAST
@given(st.text(max_size=40))
@example("00:")  # found by hypothesis: text that normalises to a number
def test_normalisers_are_idempotent(text: str) -> None:
    assert normalize_number(normalize_number(text)) == normalize_number(text)
    assert normalize_text(normalize_text(text)) == normalize_text(text)
    assert normalize_prompt(normalize_prompt(text)) == normalize_prompt(text)


@FAST
@given(n=st.integers(-(10**12), 10**12), spaces=st.text(alphabet=" \t", max_size=3))
def test_a_number_matches_itself_however_it_is_written(n: int, spaces: str) -> None:
    plain = str(n)
    grouped = f"{n:,}"
    assert normalize_number(grouped) == normalize_number(plain) == normalize_number(f"{spaces}{plain}.00{spaces}")
    text = f"<think>\nwork\n</think>\n#### {grouped}"
    assert extract_gsm8k(text) == grouped
    assert exact_match(text, (plain,), extractor=extract_gsm8k, normalizer=normalize_number)


@FAST
@given(
    words=st.lists(st.text(alphabet="abcxyz0123+=?:", min_size=1, max_size=6), min_size=1, max_size=8), data=st.data()
)
def test_prompt_keys_ignore_only_whitespace_runs(words: list[str], data: st.DataObject) -> None:
    gaps = [data.draw(st.text(alphabet=" \t\n", min_size=1, max_size=3)) for _ in words]
    spaced = "".join(w + g for w, g in zip(words, gaps, strict=True))
    assert prompt_key(spaced) == prompt_key(" ".join(words))
    assert prompt_key(" ".join(words) + "!") != prompt_key(" ".join(words))


# -- policies ---------------------------------------------------------------------------

POLICIES = [
    ("none", {}),
    ("budget", {}),
    ("marker", {"pattern": r"#### \d+\s"}),
    ("convergence", {"probe_every": 4, "window": 2}),
    ("confidence", {"probe_every": 4, "threshold": 0.9}),
    ("loop", {"min_period": 2, "max_period": 20, "repeats": 3}),
]


@FAST
@given(
    which=st.sampled_from(POLICIES),
    budget=st.integers(1, 60),
    pieces=st.lists(st.tuples(st.text(max_size=5), st.integers(1, 3)), max_size=80),
    answers=st.lists(st.one_of(st.none(), st.sampled_from(["3", "4"])), max_size=30),
)
def test_policies_never_raise_and_always_respect_the_budget(
    which: tuple[str, dict[str, Any]], budget: int, pieces: list[tuple[str, int]], answers: list[str | None]
) -> None:
    name, params = which
    policy = build_policy(name, params, budget=budget)
    thinking, text, probes = 0, "", iter(answers)
    for piece, tokens in pieces:
        thinking += tokens
        text = (text + piece)[-2048:]
        decision = policy.on_tokens(TokenEvent("thinking", piece, tokens, thinking, text))
        assert decision.action in (Action.CONTINUE, Action.PROBE, Action.STOP)
        if decision.action is Action.PROBE:
            answer = next(probes, None)
            decision = policy.on_probe(ProbeResult(thinking, answer, f" {answer}", (-0.01,)))
        if thinking >= budget:
            assert decision.action is Action.STOP and decision.reason
        if decision.action is Action.STOP:
            return
    assert thinking < budget


@FAST
@given(answers=st.lists(st.sampled_from(["3", "4", "5"]), min_size=1, max_size=20))
def test_convergence_stops_only_on_agreeing_answers(answers: list[str]) -> None:
    policy = build_policy("convergence", {"probe_every": 1, "window": 2}, budget=10_000)
    seen: list[str] = []
    for i, answer in enumerate(answers, start=1):
        policy.on_tokens(TokenEvent("thinking", "x", 1, i, "x" * i))
        seen.append(answer)
        decision = policy.on_probe(ProbeResult(i, answer, f" {answer}"))
        if decision.action is Action.STOP:
            assert len(seen) >= 2 and seen[-1] == seen[-2]
            return


def test_sse_decoder_takes_one_whole_event_per_piece_and_still_joins_data_lines() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\n\n") == [b"x"]
    assert decoder.feed(b"data: a\ndata: b\n\n") == [b"a\nb"]
    assert decoder.feed(b"data: y\r\n\r\n") == [b"y"]
    assert decoder.feed(b"data: z\n") == [] and decoder.feed(b"\n") == [b"z"]
