"""Issue 17: the peer benchmark (loadtest/peer.py), the engine client transports (loadtest/transport.py).

wrk's output, the CPU accounting of process trees and the result table are checked on fixed
inputs; one short real run (the upstream direct and stopgate, one round of 1 s, LiteLLM left out)
must write a JSON of the right shape with no errors, and a PNG. The transport benchmark's SSE
splitting and summary are checked on fixed inputs, and three variants read whole streams in a short
real run. Timings are never asserted.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from loadtest import peer, proc_cpu, transport, wrk
from loadtest.peer import Phase, Run, answer_text, request_body, schedule, summarize
from loadtest.peer_report import markdown

PNG = b"\x89PNG\r\n\x1a\n"

WRK_STDOUT = """\
Running 8s test @ http://127.0.0.1:40001/v1/completions
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    30.21ms   12.02ms  120.09ms   70.12%
    Req/Sec     1.06k   101.22     1.20k    80.00%
  8480 requests in 8.01s, 52.99MB read
  Non-2xx or 3xx responses: 3
Requests/sec:   1058.70
Transfer/sec:      6.61MB
WRK_JSON {"duration_us": 8010000, "requests": 8480, "bytes": 55563264, "connect": 0, "read": 2, "write": 0, \
"status": 3, "timeout": 1, "p50_us": 25346, "p90_us": 60043, "p99_us": 90567, "max_us": 120091, "mean_us": 30210.5}
"""


def wrk_result(requests: int, p50_ms: float = 1.0, non_2xx: int = 0) -> wrk.WrkResult:
    """One second of wrk; p99 is twice p50."""
    return wrk.WrkResult(1.0, requests, 0, non_2xx, 0, 0, p50_ms, p50_ms, 2 * p50_ms, 3 * p50_ms, p50_ms, 0.1)


def test_wrk_result_is_read_from_the_done_hook_line_in_milliseconds() -> None:
    r = wrk.parse(WRK_STDOUT, wrk_cpu_s=0.5)
    assert (r.requests, r.non_2xx, r.socket_errors, r.timeouts) == (8480, 3, 3, 1)
    assert (r.ok, r.errors) == (8477, 6)
    assert (r.p50_ms, r.p99_ms, r.max_ms) == (25.346, 90.567, 120.091)
    assert r.rps == pytest.approx(8477 / 8.01)
    assert r.wrk_cpu_s == 0.5
    with pytest.raises(ValueError, match="no WRK_JSON line"):
        wrk.parse(WRK_STDOUT.split("WRK_JSON")[0])


def test_wrk_script_posts_the_body_and_prints_the_result_line() -> None:
    body = request_body(32, stream=True, chat=False)
    script = wrk.lua_script(body, {"Content-Type": "application/json"})
    assert f"wrk.body = [==[{body.decode()}]==]" in script
    assert 'wrk.method = "POST"' in script and 'wrk.headers["Content-Type"] = "application/json"' in script
    assert wrk.MARK in script and "latency:percentile(99)" in script
    with pytest.raises(ValueError):
        wrk.lua_script(b'{"prompt": "]==]"}', {})


def test_tree_cpu_counts_every_descendant_and_its_reaped_children_once() -> None:
    # pid: (ppid, utime, stime, cutime, cstime) in ticks of 100/s
    stats = {
        10: (1, 100, 50, 20, 5),  # the root: a worker manager that has reaped a child (25 ticks)
        11: (10, 300, 30, 0, 0),  # worker
        12: (10, 200, 20, 0, 0),  # worker
        13: (11, 7, 3, 0, 0),  # a worker's helper
        20: (1, 9999, 9999, 0, 0),  # another server: not in the tree
    }
    assert proc_cpu.tree_cpu_s(10, stats, ticks_per_s=100) == pytest.approx((175 + 330 + 220 + 10) / 100)
    assert proc_cpu.tree_cpu_s(11, stats, ticks_per_s=100) == pytest.approx(3.4)
    assert proc_cpu.tree_cpu_s(99, stats, ticks_per_s=100) == 0.0  # gone


def test_process_cpu_of_this_process_is_read_from_proc() -> None:
    import os

    stats = proc_cpu.snapshot()
    assert os.getpid() in stats and stats[os.getpid()][0] == os.getppid()
    assert proc_cpu.tree_cpu_s(os.getpid(), stats) > 0.0
    assert proc_cpu.machine_busy_s() > 0.0


def test_answer_text_joins_streamed_pieces_and_requires_done() -> None:
    stream = b'data: {"choices": [{"text": "x"}]}\n\ndata: {"choices": [{"text": "y"}]}\n\ndata: {"choices": []}\n\n'
    assert answer_text(stream + b"data: [DONE]\n\n", stream=True, chat=False) == "xy"
    chat = b'data: {"choices": [{"delta": {"role": "assistant"}}]}\n\n'
    chat += b'data: {"choices": [{"delta": {"content": "z"}}]}\n\n'
    assert answer_text(chat + b"data: [DONE]\n\n", stream=True, chat=True) == "z"
    with pytest.raises(ValueError, match="DONE"):
        answer_text(stream, stream=True, chat=False)
    assert answer_text(b'{"choices": [{"message": {"content": "xx"}}]}', stream=False, chat=True) == "xx"


def test_schedule_runs_every_phase_on_every_target_each_round_in_rotated_order() -> None:
    runs = list(schedule(["engine", "stopgate", "litellm"], rounds=3, connections=32))
    assert len(runs) == 3 * 4 * 3
    firsts = [name for r, phase, name in runs if phase == Phase(False, 32)]
    assert firsts == ["engine", "stopgate", "litellm", "stopgate", "litellm", "engine", "litellm", "engine", "stopgate"]


def fixed_runs() -> list[Run]:
    """Three rounds of json@32 on the engine and stopgate; round 2 of stopgate is slow and has errors."""
    runs = []
    for r, (engine_cpu, gw_cpu, gw_requests, gw_p50, non_2xx) in enumerate(
        [(0.1, 3.0, 1000, 5.0, 0), (0.2, 4.0, 500, 9.0, 2), (0.1, 3.3, 1100, 6.0, 0)]
    ):
        e = wrk_result(10_000, p50_ms=1.0)
        runs.append(Run(r, "json@32", "engine", 1.0, e, {"engine": engine_cpu, "stopgate": 0.0}, 2.0))
        g = wrk_result(gw_requests, p50_ms=gw_p50, non_2xx=non_2xx)
        runs.append(Run(r, "json@32", "stopgate", 1.0, g, {"engine": 0.5, "stopgate": gw_cpu}, 2.0))
    return runs


def test_summary_takes_medians_over_rounds_and_sums_errors() -> None:
    s = summarize(fixed_runs(), tokens=32)["json@32"]
    assert s["engine"]["rps"] == 10_000 and s["engine"]["cpu_ms_per_request"] == pytest.approx(0.01)
    g = s["stopgate"]
    assert g["rps"] == 1000  # median of 1000, 498, 1100
    assert g["cpu_ms_per_request"] == pytest.approx(3.0)  # median of 3.0, 8.03, 3.0
    assert g["cpu_us_per_chunk"] == pytest.approx(3000 / 32)
    assert g["cores_busy"] == pytest.approx(3.3)
    assert g["added_p50_ms"] == 5.0  # per round: 4, 8, 5
    assert (g["errors"], g["non_2xx"], g["requests"]) == (2, 2, 2600)
    assert g["upstream_cpu_ms_per_request"] == pytest.approx(0.5)  # median of 0.5, 1.0, 0.4545
    assert "added_p50_ms" not in s["engine"]
    assert g["in_flight_share"] == pytest.approx(32 / 1000)  # bounds what cut-off requests add to CPU per request


def test_result_table_has_one_row_per_target_with_the_summary_numbers() -> None:
    result = {"summary": summarize(fixed_runs(), tokens=32), "config": {"connections": 32}}
    lines = markdown(result).splitlines()
    assert len(lines) == 4 and lines[1].count("---") == lines[0].count("|") - 1
    assert lines[2].startswith("| engine | 10,000 | 0.01 |") and lines[2].endswith("| - | 0 |")
    assert lines[3].startswith("| stopgate | 1,000 | 3.00 |") and lines[3].endswith("| 2 |")


@pytest.mark.skipif(shutil.which("wrk") is None, reason="needs wrk (Debian: apt-get install wrk)")
def test_short_real_run_writes_the_table_with_no_errors(tmp_path: Path) -> None:
    argv = ["--rounds", "1", "--seconds", "1", "--warmup", "0", "--no-litellm", "--workers", "1", "2"]
    assert peer.main([*argv, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "peer.json").read_text())
    assert (tmp_path / "peer.png").read_bytes().startswith(PNG)
    assert result["skipped"]["litellm"] == "--no-litellm"
    measured = {"engine", "stopgate"} | ({"stopgate-2w"} - set(result["skipped"]))
    assert set(result["summary"]) == {"json@32", "stream@32", "json@1", "stream@1"}
    for phase, rows in result["summary"].items():
        assert set(rows) == measured, phase
        for name, row in rows.items():
            assert row["errors"] == 0 and row["rounds"] == 1, (phase, name)
            assert row["rps"] > 0 and row["cpu_ms_per_request"] > 0 and row["wrk_cores_busy"] >= 0
    assert len(result["runs"]) == 4 * len(measured)
    assert set(result["ratios"]) == measured - {"engine"}


# --- engine client transports (loadtest/transport.py) ----------------------------------------------------------


def test_sse_events_are_split_on_blank_lines_and_the_rest_is_kept() -> None:
    events, rest = transport.split_events(b'data: {"a": 1}\n\n: comment\n\ndata: [DONE]\n\ndata: {"b"')
    assert (events, rest) == ([b'{"a": 1}', b"[DONE]"], b'data: {"b"')
    events, rest = transport.split_events(rest + b": 2}\n\n")
    assert (events, rest) == ([b'{"b": 2}'], b"")


def test_transport_summary_is_per_variant_medians_against_todays_client() -> None:
    def run(variant: str, cpu_s: float, requests: int = 100) -> dict[str, object]:
        return {"variant": variant, "requests": requests, "chunks": 33 * requests, "errors": 0, "bad_chunk_counts": 0,
                "cpu_s": cpu_s, "wall_s": 1.0, "upstream_cpu_s": 0.05}  # fmt: skip

    runs = [run(transport.TODAY, c) for c in (0.3, 0.2, 0.25)] + [run("aiohttp:bytes:json", c) for c in (0.05, 0.1)]
    s = transport.summarize(runs)
    assert s[transport.TODAY]["client_cpu_us_per_request"] == pytest.approx(2500)
    assert s["aiohttp:bytes:json"]["cpu_vs_today"] == pytest.approx(750 / 2500)
    assert s["aiohttp:bytes:json"]["upstream_cpu_us_per_request"] == pytest.approx(500)
    table = transport.markdown(s, 32).splitlines()
    assert table[2].startswith("| aiohttp:bytes:json | 750 |") and "(today)" in table[3]


def test_every_transport_reads_the_whole_stream_in_a_short_real_run(tmp_path: Path) -> None:
    chosen = [transport.TODAY, "httpx-aiohttp:lines:json", "aiohttp:bytes:msgspec"]
    argv = ["--rounds", "1", "--seconds", "0.3", "--warmup", "0", "--concurrency", "2", "--variants", *chosen]
    assert transport.main([*argv, "--out", str(tmp_path / "t.json")]) == 0
    summary = json.loads((tmp_path / "t.json").read_text())["summary"]
    assert set(summary) == set(chosen)
    assert all(row["errors"] == 0 and row["client_cpu_us_per_request"] > 0 for row in summary.values())
