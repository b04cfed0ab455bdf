"""EM sampling and the control plane against the scripted fake engine: gold, canary, shadow, admin API, persistence."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from loadtest.fake_engine import Script
from tests.support.control import ADMIN, ITEMS, KEY, complete, state, write_jsonl
from tests.support.waiting import wait_until
from tests.support.wire import assert_openai_error

# -- gold samples --------------------------------------------------------------


def test_live_requests_that_match_a_reference_item_become_gold_samples(plane_gateway: Any) -> None:
    engine, start = plane_gateway
    with start() as (url, _):
        assert complete(url, reference_id="a1").status_code == 200  # by id: "#### 3" is right
        assert complete(url, prompt="  Q:  2+2=?  ").status_code == 200  # by normalised prompt: "#### 3" is wrong
        assert complete(url, prompt="Q: 9+9=?\n").status_code == 200  # no item: no sample
        chat = {"model": "arith", "messages": [{"role": "user", "content": "Q: 1+2=?"}]}
        assert httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=30).status_code == 200
        s = state(url)
    assert s["samples"] == {"gold": 3, "canary": 0, "shadow": 0}
    window = s["controller"]["window"]
    assert window["samples"] == 3 and window["em"] == pytest.approx(2 / 3)
    low, high = window["wilson95"]
    assert 0 < low < 2 / 3 < high < 1
    # The gateway's own field never reaches the engine.
    assert all("reference_id" not in body for body in engine.stats.requests)


def test_streamed_requests_are_scored_too(plane_gateway: Any) -> None:
    _, start = plane_gateway
    with start() as (url, _):
        with httpx.stream(
            "POST",
            f"{url}/v1/completions",
            json={"model": "arith", "prompt": "Q: 1+2=?\n", "stream": True, "stopgate": {"reference_id": "a1"}},
            timeout=30,
        ) as r:
            r.read()
        s = state(url)
    assert s["samples"]["gold"] == 1 and s["controller"]["window"]["em"] == 1.0


def test_a_stream_the_client_left_is_no_sample(plane_gateway: Any) -> None:
    engine, start = plane_gateway
    engine.default = Script(pieces=["<think>"] + ["1+2=3\n"] * 200, delay_s=0.01)
    with start() as (url, _):
        body = {"model": "arith", "prompt": "Q: 1+2=?\n", "stream": True, "stopgate": {"reference_id": "a1"}}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            next(r.iter_lines())  # one chunk, then leave: the partial text must not be scored (as wrong)
        assert wait_until(lambda: engine.stats.cancelled == 1 and engine.stats.active == 0)
        time.sleep(0.2)
        s = state(url)
    assert s["samples"]["gold"] == 0 and s["controller"]["window"]["samples"] == 0


def test_an_unknown_reference_id_is_a_400_and_reaches_no_engine(plane_gateway: Any) -> None:
    engine, start = plane_gateway
    with start() as (url, _):
        r = complete(url, reference_id="nope")
        assert_openai_error(r, 400, param="reference_id")
        assert "nope" in r.json()["error"]["message"]
    assert engine.stats.requests == []


def test_gold_samples_tighten_the_budget_and_requests_run_at_it(plane_gateway: Any) -> None:
    engine, start = plane_gateway
    with start() as (url, _):
        for _ in range(40):
            assert complete(url, reference_id="a1").status_code == 200
        s = state(url)
        budget = s["budget"]
        assert budget < 400 and s["controller"]["adjustments"] >= 1
        body = complete(url).json()  # a request with no reference runs at the controller's budget
    assert body["stopgate"]["budget"] == budget


def test_requests_that_override_the_settings_are_scored_but_do_not_move_the_budget(plane_gateway: Any) -> None:
    _, start = plane_gateway
    with start() as (url, _):
        for _ in range(40):
            assert complete(url, reference_id="a1", stopgate={"budget": 300}).status_code == 200
        s = state(url)
    assert s["samples"]["gold"] == 40 and s["budget"] == 400 and s["controller"]["adjustments"] == 0


# -- canary and shadow ------------------------------------------------------------


def test_canaries_replay_reference_items_within_the_evaluation_share(plane_gateway: Any) -> None:
    engine, start = plane_gateway
    with start(evaluation={"canary_per_minute": 6000}, eval_share=0.5, eval_priority=7) as (url, _):
        time.sleep(0.5)
        assert state(url)["samples"]["canary"] == 0  # no live tokens yet: nothing funds a canary
        complete(url, prompt="Q: 9+9=?\n")  # 10 live tokens (the scripted answer)
        assert wait_until(lambda: state(url)["samples"]["canary"] >= 1)
        time.sleep(0.5)
        s = state(url)
    # Each canary costs 10 tokens here: half of the 10 live tokens buys exactly one.
    assert s["samples"]["canary"] == 1
    assert s["eval_share"]["eval_tokens"] == 10 and s["eval_share"]["live_tokens"] == 10
    canaries = [b for b in engine.stats.requests if b.get("priority") == 7]
    assert len(canaries) == 1 and canaries[0]["prompt"] in {it["prompt"] for it in ITEMS}
    assert canaries[0]["temperature"] == 0.0


def test_early_stopped_live_requests_get_a_full_length_shadow_rerun(plane_gateway: Any) -> None:
    engine, start = plane_gateway
    long_answer = ["<think>", "\n"] + list("1+2=3\n") * 20 + ["</think>", "\n#### 3"]
    engine.default = Script(pieces=long_answer)
    engine.responder = lambda body, headers: (
        Script(pieces=[" 3"]) if headers.get("x-request-id", "").endswith("-forced") else Script(pieces=long_answer)
    )
    with start(evaluation={"shadow_share": 1.0}, eval_share=100.0, eval_priority=7) as (url, _):
        httpx.put(f"{url}/admin/routes/arith/budget", json={"budget": 20}, headers=ADMIN, timeout=10)
        body = complete(url, prompt="Q: 9+9=?\n").json()
        assert body["stopgate"]["stop_reason"] == "budget"
        assert wait_until(lambda: state(url)["samples"]["shadow"] == 1)
        s = state(url)
    shadow = [b for b in engine.stats.requests if b.get("priority") == 7]
    assert len(shadow) == 1 and shadow[0]["max_tokens"] == 400
    assert s["controller"]["window"]["em"] == 1.0  # the early answer " 3" equals the full answer
    assert s["eval_share"]["eval_tokens"] == len(long_answer)


def test_no_evaluation_work_while_the_gateway_is_busy(plane_gateway: Any) -> None:
    _, start = plane_gateway
    with start(evaluation={"shadow_share": 1.0}, eval_share=100.0, eval_max_in_flight=1) as (url, registry):
        # The request itself is in flight when it finishes, so with a limit of 1 the gateway counts as busy.
        complete(url, prompt="Q: 9+9=?\n", stopgate={"budget": 3})
        time.sleep(0.3)
        skipped = registry.get_sample_value(
            "stopgate_evaluation_skipped_total", {"route": "arith", "source": "shadow", "reason": "busy"}
        )
        assert state(url)["samples"]["shadow"] == 0
    assert skipped == 1


# -- the admin API ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/routes"),
        ("GET", "/admin/routes/arith"),
        ("POST", "/admin/routes/arith/freeze"),
        ("PUT", "/admin/routes/arith/budget"),
        ("GET", "/admin/no/such/endpoint"),
        ("DELETE", "/admin/routes"),
    ],
)
def test_a_wrong_admin_key_is_a_401_on_every_admin_path(plane_gateway: Any, method: str, path: str) -> None:
    _, start = plane_gateway
    with start() as (url, _):
        for headers in ({}, {"authorization": "Bearer wrong"}, {"x-admin-key": "wrong"}):
            r = httpx.request(method, f"{url}{path}", headers=headers, json={"budget": 10}, timeout=10)
            assert_openai_error(r, 401)
        assert httpx.get(f"{url}/admin/no/such/endpoint", headers=ADMIN, timeout=10).status_code == 404
        assert httpx.get(f"{url}/admin/routes", headers={"x-admin-key": KEY}, timeout=10).status_code == 200


def test_without_an_admin_key_the_admin_api_is_off(plane_gateway: Any) -> None:
    _, start = plane_gateway
    with start(admin_key=None) as (url, _):
        r = httpx.get(f"{url}/admin/routes", headers=ADMIN, timeout=10)
    assert_openai_error(r, 404)


def test_freeze_override_and_retarget_through_the_admin_api(plane_gateway: Any) -> None:
    _, start = plane_gateway
    with start() as (url, _):
        assert httpx.post(f"{url}/admin/routes/arith/freeze", headers=ADMIN, timeout=10).json()["controller"]["frozen"]
        for _ in range(40):
            complete(url, reference_id="a1")
        assert state(url)["budget"] == 400  # frozen: all correct, yet no move
        r = httpx.put(f"{url}/admin/routes/arith/budget", json={"budget": 96}, headers=ADMIN, timeout=10)
        assert r.status_code == 200 and r.json()["budget"] == 96
        assert complete(url).json()["stopgate"]["budget"] == 96
        r = httpx.put(f"{url}/admin/routes/arith/target", json={"target": 0.95}, headers=ADMIN, timeout=10)
        assert r.json()["controller"]["target"] == 0.95
        httpx.post(f"{url}/admin/routes/arith/unfreeze", headers=ADMIN, timeout=10)
        assert not state(url)["controller"]["frozen"]


@pytest.mark.parametrize(
    ("path", "body", "param", "says"),
    [
        ("target", {"target": 0.0}, "target", "(0, 1]"),
        ("target", {"target": 1.5}, "target", "(0, 1]"),
        ("target", {"target": "high"}, "target", "number"),
        ("budget", {"budget": 4}, "budget", "outside"),
        ("budget", {"budget": 1000}, "budget", "outside"),
        ("budget", {"budget": 9.5}, "budget", "integer"),
        ("budget", {}, "budget", "integer"),
    ],
)
def test_bad_admin_input_is_a_400_and_changes_nothing(
    plane_gateway: Any, path: str, body: dict[str, Any], param: str, says: str
) -> None:
    _, start = plane_gateway
    with start() as (url, _):
        before = state(url)
        r = httpx.put(f"{url}/admin/routes/arith/{path}", json=body, headers=ADMIN, timeout=10)
        assert_openai_error(r, 400, param=param)
        assert says in r.json()["error"]["message"]
        assert state(url) == before


def test_malformed_admin_json_is_a_400(plane_gateway: Any) -> None:
    _, start = plane_gateway
    with start() as (url, _):
        r = httpx.put(f"{url}/admin/routes/arith/target", content=b"{nope", headers=ADMIN, timeout=10)
    assert_openai_error(r, 400)


def test_an_unknown_route_is_a_404_naming_the_routes(plane_gateway: Any) -> None:
    _, start = plane_gateway
    with start() as (url, _):
        r = httpx.get(f"{url}/admin/routes/nope", headers=ADMIN, timeout=10)
    assert_openai_error(r, 404, param="route")
    assert "arith" in r.json()["error"]["message"]


def test_a_reference_upload_replaces_the_set_as_a_whole(plane_gateway: Any) -> None:
    _, start = plane_gateway
    new = [{"id": "b1", "prompt": "Q: 7+7=?\n", "answers": ["14"], "route": "arith"}]
    with start() as (url, _):
        text = "".join(json.dumps(it) + "\n" for it in new)
        r = httpx.put(f"{url}/admin/routes/arith/references/extra", content=text, headers=ADMIN, timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["references"] == {"sets": ["refs", "extra"], "items": 4}
        assert complete(url, prompt="Q: 7+7=?\n", reference_id="b1").status_code == 200
        assert complete(url, prompt="Q: 7+7=?").status_code == 200  # matched by prompt too
        assert state(url)["samples"]["gold"] == 2


@pytest.mark.parametrize(
    ("lines", "says"),
    [
        (['{"id": "x", "prompt": "Q: 1=?", "answers": ["1"], "route": "arith"}', "{not json"], "line 2"),
        (
            [
                '{"id": "x", "prompt": "Q: 1=?", "answers": ["1"], "route": "arith"}',
                '{"id": "x", "prompt": "Q: 2=?", "answers": ["2"], "route": "arith"}',
            ],
            "duplicate id 'x'",
        ),
        (['{"id": "x", "prompt": "Q: 1=?", "answers": [], "route": "arith"}'], "answers"),
        (['{"id": "x", "prompt": "Q: 1=?", "route": "arith"}'], "answers"),
        (['{"id": "a1", "prompt": "Q: 1=?", "answers": ["1"], "route": "arith"}'], "duplicate id 'a1'"),
        (['{"id": "x", "prompt": "Q: 1=?", "answers": ["1"], "route": "other"}'], "belongs to route 'other'"),
    ],
)
def test_a_bad_reference_upload_is_rejected_whole_and_names_the_line(
    plane_gateway: Any, lines: list[str], says: str
) -> None:
    _, start = plane_gateway
    with start() as (url, _):
        before = state(url)
        r = httpx.put(f"{url}/admin/routes/arith/references/extra", content="\n".join(lines), headers=ADMIN, timeout=10)
        assert_openai_error(r, 400, param="body")
        assert says in r.json()["error"]["message"]
        assert state(url) == before
        assert complete(url, reference_id="x").status_code == 400  # nothing of the set was loaded


# -- persistence ------------------------------------------------------------------


def test_the_controller_state_survives_a_restart(plane_gateway: Any, tmp_path: Path) -> None:
    _, start = plane_gateway
    db = str(tmp_path / "state.db")
    with start(control={}, state_path=db) as (url, _):
        for _ in range(40):
            complete(url, reference_id="a1")
        before = state(url)
    assert before["budget"] < 400
    with start(control={}, state_path=db) as (url, _):
        after = state(url)
    assert after["budget"] == before["budget"]
    assert after["samples"] == before["samples"]
    assert after["controller"]["window"] == before["controller"]["window"]


# -- the demo ---------------------------------------------------------------------


def test_the_demo_drive_loop_and_plot_work_against_a_gateway(plane_gateway: Any, tmp_path: Path) -> None:
    import asyncio

    from gateway.demo import drive, plot
    from gateway.evaluation import load_reference_file

    _, start = plane_gateway
    items = list(load_reference_file(write_jsonl(tmp_path / "items.jsonl", ITEMS)))
    with start() as (url, _):
        points = asyncio.run(drive(url, KEY, "arith", items, 30, concurrency=4, retarget_at=20, retarget=0.9))
    assert [p.sample for p in points] == list(range(1, 31))
    assert {p.target for p in points[:15]} == {0.8} and points[-1].target == 0.9
    assert sum(p.correct for p in points) == 10  # the scripted answer is right for a1 only
    out = tmp_path / "demo.png"
    plot(points, out, "test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--target", "1.5"], "--target must be in (0, 1]"),
        (["--samples", "0"], "--samples and --concurrency must be >= 1"),
        (["--references", "/nonexistent.jsonl"], "cannot read"),
    ],
)
def test_bad_demo_arguments_are_a_clear_error(args: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    assert main(["demo", *args]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_an_accepted_upload_survives_a_restart(plane_gateway: Any, tmp_path: Path) -> None:
    _, start = plane_gateway
    db = str(tmp_path / "state.db")
    text = json.dumps({"id": "b1", "prompt": "Q: 7+7=?\n", "answers": ["14"], "route": "arith"}) + "\n"
    with start(state_path=db) as (url, _):
        r = httpx.put(f"{url}/admin/routes/arith/references/extra", content=text, headers=ADMIN, timeout=10)
        assert r.status_code == 200
    with start(state_path=db) as (url, _):
        assert state(url)["references"] == {"sets": ["refs", "extra"], "items": 4}
        assert complete(url, prompt="Q: 7+7=?\n", reference_id="b1").status_code == 200
