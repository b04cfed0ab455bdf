"""Issue 8: the soak benchmark (loadtest/soak.py) runs briefly end to end and defines RSS growth as documented."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from loadtest.soak import SoakConfig, growth, run_soak

PNG = b"\x89PNG\r\n\x1a\n"


def test_growth_compares_the_last_tenth_of_the_load_with_the_end_of_warmup() -> None:
    times = [float(t) for t in range(-2, 13)]  # idle before, 10 s of load, drain after
    rss = [50.0, 50.0] + [100.0 + t for t in range(11)] + [500.0, 500.0]  # 1 MB/s; the drain is ignored
    g = growth(times, rss, duration=10.0, warmup=2.0)
    assert g["at_end_of_warmup"] == 102.0
    assert g["end"] == 110.0  # the mean of the samples in (9, 10]
    assert g["growth_pct"] == pytest.approx(8 / 102 * 100)
    assert g["fitted_growth_pct"] == pytest.approx(8 / 102 * 100)  # slope 1 MB/s over the 8 s after warm-up


def test_growth_is_undefined_without_samples_in_the_windows() -> None:
    assert growth([-1.0, 0.5], [50.0, 60.0], duration=10.0, warmup=2.0)["growth_pct"] is None


@pytest.mark.usefixtures("engine_transport")  # under each HTTP stack of the engine client
def test_a_short_soak_writes_sane_outputs_and_leaves_no_client_behind(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    config = SoakConfig(streams=50, duration=6.0, drain=10.0, pieces=(10, 20), delay=0.01, interval=0.5, out=out)
    summary = run_soak(config)
    assert summary["complete"], summary["note"]
    assert json.loads((out / "soak.json").read_text()) == summary
    assert (out / "soak.png").read_bytes().startswith(PNG)
    rss, fds, requests = summary["rss_mb"], summary["fds"], summary["requests"]
    assert 0 < rss["idle_before"] <= rss["peak"] < 1000
    assert rss["at_end_of_warmup"] > 0 and rss["end"] > 0 and rss["growth_pct"] is not None
    assert fds["idle_before"] > 0 and fds["max"] > 50  # 50 client sockets at least, while loaded
    assert requests["completed"] > 50 and requests["streams_per_s"] > 0
    assert requests["errors"] == 0 and requests["cut_at_end"] == 0, requests["errors_by_kind"]
    assert requests["max_in_flight"] == 50
    assert summary["goals"]["peak_rss_mb"]["pass"] is not None
    with open(out / "soak.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"idle-before", "warmup", "load", "idle-after"} <= {r["phase"] for r in rows}
    assert all(float(r["gateway_rss_mb"]) > 0 and int(r["gateway_fds"]) > 0 for r in rows)
    for pid in filter(str.isdigit, os.listdir("/proc")):  # the client process was ended
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        assert str(out).encode() not in cmdline, cmdline
