"""Soak benchmark (issue 8): the gateway under steady streaming load; its RSS and open fds over time.

Starts the fake engine (reasoning-like answers of ``--pieces`` pieces, ``--delay`` s apart) and
``stopgate serve --upstream`` as child processes on loopback, then a client in a third process that
keeps ``--streams`` streams open in a closed loop (request, read the SSE stream to ``[DONE]``,
repeat) for ``--duration`` s, then lets the open streams finish (at most ``--drain`` s). Once a
second this process reads VmRSS (/proc/<pid>/status) and the open fds (/proc/<pid>/fd) of the
gateway and of any children it has. The client runs apart so that its memory and CPU stay out of
what is measured.

Times count from the moment the client started its load (t = 0); D is ``--duration``. One
sample is taken before the load (``idle-before``, servers up, no client connected) and two
after the client has gone (``idle-after``). RSS is VmRSS summed over the gateway's process tree,
in MB = 10^6 bytes (the stricter reading of the goal); fds likewise.

- warm-up: 0 <= t <= W, W = ``--warmup`` (default 20% of D).
- RSS at end of warm-up: the last sample with t <= W.
- end RSS: the mean of the samples in the last 10% of the load, 0.9 D < t <= D.
- growth % = (end RSS - RSS at end of warm-up) / RSS at end of warm-up * 100. Goal: <= 5%.
- fitted growth % = least-squares slope of RSS over W <= t <= D, times (D - W), over the RSS at
  end of warm-up, * 100: what the trend adds across the measured period (reported, no goal).
- peak RSS: the highest sample of the whole run (idle, load, drain). Goal: < 200 MB.
- a stream succeeds when it is HTTP 200, carries the answer (``#### 3``), has no error event and
  ends with ``data: [DONE]``; anything else is an error, counted by kind (``HTTP 503``,
  ``ReadTimeout``, ``error event: <type>``, ``ended without [DONE]``, ...). Streams still open
  when the drain ends are cut (counted, not errors).
- streams/s: streams that succeeded in 0 < t <= D, over D (over the load's seconds if cut short).

    python -m loadtest.soak --streams 1000 --duration 180 --out results/soak

writes ``soak.json`` (summary), ``soak.csv`` (one row per sample), ``soak.png`` and the three
processes' logs to ``--out``. Ctrl-C (or SIGTERM) stops the run and writes what it has with
``"complete": false``; the children are always ended.

The load client runs from ``loadtest/soak_client.py`` and the samples are read by
``loadtest/soak_sample.py``; this module holds the config, the run, the summary and its outputs,
and the command line.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from gateway.engine.embedded import free_port
from loadtest.common import EMBEDDED_ENV
from loadtest.overhead import Popen, child
from loadtest.soak_client import client_main
from loadtest.soak_sample import Sample, sample

GOALS = {"rss_growth_pct": 5.0, "peak_rss_mb": 200.0}
MAX_PIECES = 400  # the arith route's thinking budget
READY_S = 30.0  # for each child to answer its health check
CLIENT_START_S = 30.0  # for the client process to start its load


@dataclass(frozen=True)
class SoakConfig:
    streams: int = 1000
    duration: float = 180.0
    warmup: float | None = None  # seconds; None: 20% of the duration
    drain: float = 15.0
    pieces: tuple[int, int] = (50, 100)
    delay: float = 0.03
    interval: float = 1.0
    out: Path = Path("results/soak")

    @property
    def warmup_s(self) -> float:
        return 0.2 * self.duration if self.warmup is None else self.warmup


# --- the run ----------------------------------------------------------------------------------------------


def _wait_ready(url: str, proc: Popen, name: str, log: Path) -> None:
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"soak: the {name} exited with code {proc.returncode}; see {log}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"soak: {url} was not ready within {READY_S:.0f} s; see {log}")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_soak(config: SoakConfig) -> dict[str, Any]:
    """Run the soak, write its outputs to ``config.out`` and return the summary (also on Ctrl-C/SIGTERM)."""
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    progress, go = out / "client-progress.json", out / "client-go"
    progress.unlink(missing_ok=True)
    go.unlink(missing_ok=True)
    engine_port, gateway_port, py = free_port(), free_port(), sys.executable
    engine_url, gateway_url = f"http://127.0.0.1:{engine_port}", f"http://127.0.0.1:{gateway_port}"
    env = {**os.environ, **EMBEDDED_ENV, "STOPGATE_LOG_LEVEL": "warning", "PYTHONUNBUFFERED": "1"}
    low, high = config.pieces
    engine_cmd = [py, "-m", "loadtest.fake_engine", "--port", str(engine_port), "--think"]
    engine_cmd += ["--tokens", str(low), "--tokens-max", str(high), "--delay", str(config.delay)]
    gateway_cmd = [py, "-m", "gateway.cli", "serve", "--upstream", engine_url, "--port", str(gateway_port)]
    client_cmd = [py, "-m", "loadtest.soak", "--client-of", gateway_url, "--progress", str(progress), "--go", str(go)]
    client_cmd += ["--streams", str(config.streams), "--duration", str(config.duration), "--drain", str(config.drain)]
    samples: list[Sample] = []
    complete, note = False, ""
    main_thread = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        with (
            child(engine_cmd, out / "engine.log", env) as engine,
            child(gateway_cmd, out / "gateway.log", env) as gateway,
        ):
            with child(client_cmd, out / "client.log", env) as client:
                _wait_ready(f"{engine_url}/health", engine, "fake engine", out / "engine.log")
                _wait_ready(f"{gateway_url}/ready", gateway, "gateway", out / "gateway.log")
                samples.append(sample("idle-before", gateway, engine, None, progress))
                go.touch()
                complete, note = _watch(config, gateway, engine, client, progress, samples)
            for _ in range(2 if gateway.poll() is None else 0):  # what stays open once the clients have gone
                time.sleep(config.interval)
                samples.append(sample("idle-after", gateway, engine, None, progress))
    except KeyboardInterrupt:
        complete, note = False, "interrupted"
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    summary = summarize(samples, config, complete, note, {"engine": engine_cmd, "gateway": gateway_cmd}, env)
    write_outputs(summary, samples, out)
    return summary


def _watch(
    config: SoakConfig, gateway: Popen, engine: Popen, client: Popen, progress: Path, samples: list[Sample]
) -> tuple[bool, str]:
    """Sample every ``config.interval`` s until the client exits; (complete, why not)."""
    deadline = time.monotonic() + CLIENT_START_S + config.duration + config.drain + 10
    next_at = time.monotonic()
    try:
        while client.poll() is None:
            if gateway.poll() is not None or engine.poll() is not None:
                return False, "the gateway or the fake engine exited during the run; see their logs"
            if time.monotonic() > deadline:
                return False, "the client overran its time budget"
            samples.append(sample("run", gateway, engine, client, progress))
            next_at += config.interval
            time.sleep(max(0.0, next_at - time.monotonic()))
    except KeyboardInterrupt:
        client.terminate()  # the client writes what it has, then exits
        try:
            client.wait(10)
        except subprocess.TimeoutExpired:
            pass
        samples.append(sample("idle-after", gateway, engine, None, progress))
        raise
    samples.append(sample("run", gateway, engine, None, progress))  # the client's last progress
    state = samples[-1].client
    if client.returncode != 0 or state.get("phase") not in ("done", "cut"):
        return False, f"the client ended in phase {state.get('phase')!r} with code {client.returncode}"
    if state["phase"] == "cut":  # the load itself ran whole, so the run still gives a verdict
        return True, f"{state['cut_at_end']} streams were still open when the drain ended"
    return True, ""


# --- the summary and the outputs --------------------------------------------------------------------------


def _load_started_at(samples: list[Sample]) -> float:
    """When the client started its load (wall clock); the first sample's time if it never did."""
    started = next((s.client.get("started_at") for s in reversed(samples) if s.client.get("started_at")), None)
    return float(started or (samples[0].at if samples else time.time()))


def growth(times: list[float], rss: list[float], duration: float, warmup: float) -> dict[str, float | None]:
    """RSS at end of warm-up, end RSS and growth % as defined in this module's docstring (None when undefined)."""
    warm = [r for t, r in zip(times, rss, strict=True) if 0 <= t <= warmup]
    last = [r for t, r in zip(times, rss, strict=True) if 0.9 * duration < t <= duration]
    post = [(t, r) for t, r in zip(times, rss, strict=True) if warmup <= t <= duration]
    at_warm = warm[-1] if warm else None
    end = sum(last) / len(last) if last else None
    pct = (end - at_warm) / at_warm * 100 if at_warm and end is not None else None
    fitted = None
    if at_warm and len(post) >= 2 and duration > warmup:
        n = len(post)
        mt, mr = sum(t for t, _ in post) / n, sum(r for _, r in post) / n
        var = sum((t - mt) ** 2 for t, _ in post)
        if var > 0:
            slope = sum((t - mt) * (r - mr) for t, r in post) / var
            fitted = slope * (duration - warmup) / at_warm * 100
    return {"at_end_of_warmup": at_warm, "end": end, "growth_pct": pct, "fitted_growth_pct": fitted}


def summarize(
    samples: list[Sample],
    config: SoakConfig,
    complete: bool,
    note: str,
    commands: dict[str, list[str]],
    env: dict[str, str],
) -> dict[str, Any]:
    client = next((s.client for s in reversed(samples) if s.client), {})
    started_at = _load_started_at(samples)
    times = [s.at - started_at for s in samples]
    rss = [s.gateway_rss_mb for s in samples]
    fds = [s.gateway_fds for s in samples]
    warmup = config.warmup_s
    g = growth(times, rss, config.duration, warmup)
    loaded = [i for i, t in enumerate(times) if 0 <= t <= config.duration]
    idle_before = next((s for s in reversed(samples) if s.stage == "idle-before"), None)
    idle_after = next((s for s in reversed(samples) if s.stage == "idle-after"), None)
    fd_warm = [fds[i] for i in loaded if times[i] <= warmup]
    fd_end = [fds[i] for i in loaded if times[i] > 0.9 * config.duration]
    in_load = client.get("completed_in_load", 0)
    # Seconds of load the client ran: the whole duration unless the run was cut short.
    load_s = min(config.duration, max(0.0, client.get("written_at", started_at) - started_at))
    peak = max(rss, default=None)
    cores = _cores(samples, loaded)
    errors = client.get("errors", {})
    summary: dict[str, Any] = {
        "complete": complete,
        "note": note,
        "config": {
            **json.loads(json.dumps(asdict(config), default=str)),
            "warmup_s": warmup,
            "commands": {k: " ".join(v) for k, v in commands.items()},
            "stopgate_env": {k: v for k, v in env.items() if k.startswith("STOPGATE_")},
            "cpus": os.cpu_count(),
            "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            "python": sys.version.split()[0],
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at)),
            "gateway_code": subprocess.run(  # -dirty: tracked files had uncommitted changes
                ["git", "-C", str(Path(__file__).resolve().parent.parent), "describe", "--always", "--dirty"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip(),
        },
        "rss_mb": {
            "idle_before": idle_before.gateway_rss_mb if idle_before else None,
            "min": min((rss[i] for i in loaded), default=None),
            "max": max((rss[i] for i in loaded), default=None),
            **g,
            "peak": peak,
            "idle_after": idle_after.gateway_rss_mb if idle_after else None,
        },
        "fds": {
            "idle_before": idle_before.gateway_fds if idle_before else None,
            "min": min((fds[i] for i in loaded), default=None),
            "max": max((fds[i] for i in loaded), default=None),
            "at_end_of_warmup": fd_warm[-1] if fd_warm else None,
            "end": sum(fd_end) / len(fd_end) if fd_end else None,
            "idle_after": idle_after.gateway_fds if idle_after else None,
        },
        "gateway_threads_max": max((s.gateway_threads for s in samples), default=None),
        "gateway_processes_max": max((s.gateway_procs for s in samples), default=None),
        "requests": {
            "completed": client.get("completed", 0),
            "completed_during_load": in_load,
            "errors": sum(errors.values()),
            "errors_by_kind": errors,
            "cut_at_end": client.get("cut_at_end", 0),
            "streams_per_s": in_load / load_s if load_s > 0 else None,
            "load_s": load_s,
            "max_in_flight": max((s.client.get("in_flight", 0) for s in samples), default=0),
        },
        "cores_busy": cores,
        "samples": len(samples),
    }
    measured = {"rss_growth_pct": g["growth_pct"], "peak_rss_mb": peak}
    checks = {}
    for name, value in measured.items():
        ok = (
            None
            if value is None or not complete
            else bool(value <= GOALS[name] if "growth" in name else value < GOALS[name])
        )
        checks[name] = {"measured": value, "limit": GOALS[name], "pass": ok}
    summary["goals"] = checks
    return summary


def _cores(samples: list[Sample], loaded: list[int]) -> dict[str, float]:
    """Cores each process kept busy over the load (2.0 on a 2-core box: saturated)."""
    if len(loaded) < 2:
        return {}
    a, b = samples[loaded[0]], samples[loaded[-1]]
    wall = b.at - a.at
    return {k: (b.cpu[k] - a.cpu[k]) / wall for k in a.cpu if k in b.cpu} if wall > 0 else {}


def write_outputs(summary: dict[str, Any], samples: list[Sample], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(summary, indent=2) + "\n")
    started_at = _load_started_at(samples)
    rows = []
    for s in samples:
        row = {k: getattr(s, k) for k in (f.name for f in fields(Sample)) if k not in ("stage", "cpu", "client", "at")}
        t = s.at - started_at
        row = {"t_s": round(t, 3), "phase": _phase(s, t, summary["config"]), **row}
        row |= {f"cpu_s_{k}": round(v, 3) for k, v in s.cpu.items() if k != "client"}
        row |= {"client_in_flight": s.client.get("in_flight", 0), "client_completed": s.client.get("completed", 0)}
        row["client_errors"] = sum(s.client.get("errors", {}).values())
        rows.append(row)
    with open(out / "soak.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["t_s"])
        writer.writeheader()
        writer.writerows(rows)
    if rows:
        plot(rows, summary, out / "soak.png")


def _phase(s: Sample, t: float, config: dict[str, Any]) -> str:
    if s.stage != "run":
        return s.stage
    if t < 0:
        return "starting"
    return "warmup" if t <= config["warmup_s"] else "load" if t <= config["duration"] else "drain"


def plot(rows: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t_s"] for r in rows]
    c = summary["config"]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    try:
        top.plot(t, [r["gateway_rss_mb"] for r in rows], color="tab:blue", label="gateway RSS")
        top.axhline(GOALS["peak_rss_mb"], color="tab:red", linestyle="--", label=f"goal < {GOALS['peak_rss_mb']:g} MB")
        if (warm := summary["rss_mb"]["at_end_of_warmup"]) is not None:
            top.axhline(warm * (1 + GOALS["rss_growth_pct"] / 100), color="tab:orange", linestyle=":",
                        label=f"end of warm-up + {GOALS['rss_growth_pct']:g}%")  # fmt: skip
        top.set_ylabel("RSS (MB)")
        top.set_ylim(bottom=0)
        top.legend(loc="lower right", fontsize="small")
        bottom.plot(t, [r["gateway_fds"] for r in rows], color="tab:green", label="gateway open fds")
        bottom.plot(t, [r["client_in_flight"] for r in rows], color="tab:gray", linestyle="--", label="streams open")
        bottom.set_ylabel("count")
        bottom.set_xlabel("seconds since the load started")
        bottom.legend(loc="lower right", fontsize="small")
        for ax in (top, bottom):
            ax.axvspan(0, c["warmup_s"], color="0.9", zorder=0)
            ax.axvline(c["duration"], color="0.5", linewidth=0.8)
        g = summary["rss_mb"]["growth_pct"]
        fig.suptitle(
            f"stopgate soak: {c['streams']} streams, {c['duration']:g} s; RSS growth after warm-up "
            + ("n/a" if g is None else f"{g:+.1f}%")
            + ("" if summary["complete"] else " (incomplete)")
        )
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def report(summary: dict[str, Any], out: Path) -> None:
    r, f, q, c = summary["rss_mb"], summary["fds"], summary["requests"], summary["config"]

    def num(v: float | None, spec: str = ".1f") -> str:
        return "n/a" if v is None else format(v, spec)

    print(f"\nsoak: {c['streams']} streams for {c['duration']:g} s (warm-up {c['warmup_s']:g} s), "
          f"{c['pieces'][0]}-{c['pieces'][1]} pieces {c['delay']:g} s apart"
          + (f"  ({summary['note']})" if summary["complete"] and summary["note"] else "" if summary["complete"]
             else f"  INCOMPLETE: {summary['note']}"))  # fmt: skip
    print(f"  RSS MB: idle {num(r['idle_before'])}, min {num(r['min'])}, end of warm-up {num(r['at_end_of_warmup'])},"
          f" end {num(r['end'])}, peak {num(r['peak'])}, idle after {num(r['idle_after'])}")  # fmt: skip
    g, fitted = num(r["growth_pct"], "+.2f"), num(r["fitted_growth_pct"], "+.2f")
    print(f"  RSS growth after warm-up: {g} % (fitted: {fitted} %)")
    print(f"  fds: idle {f['idle_before']}, min {f['min']}, max {f['max']}, end of warm-up {f['at_end_of_warmup']},"
          f" end {num(f['end'], '.0f')}, idle after {f['idle_after']}")  # fmt: skip
    print(
        f"  streams: {q['completed']} completed ({num(q['streams_per_s'])}/s during the load), "
        f"max open {q['max_in_flight']}, errors {q['errors']} {q['errors_by_kind'] or ''}, cut at end {q['cut_at_end']}"
    )
    print("  cores busy: " + ", ".join(f"{k} {v:.2f}" for k, v in summary["cores_busy"].items()))
    for name, check in summary["goals"].items():
        verdict = {True: "PASS", False: "FAIL", None: "NO VERDICT"}[check["pass"]]
        print(f"  {name:16}{num(check['measured'], '.2f'):>9} (limit {check['limit']:g})  {verdict}")
    print(f"wrote {out}/soak.json, soak.csv, soak.png and the logs")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--streams", type=int, default=1000, help="concurrent streaming clients")
    ap.add_argument("--duration", type=float, default=180.0, help="seconds of load")
    ap.add_argument("--warmup", type=float, help="seconds of warm-up (default: 20%% of the duration)")
    ap.add_argument("--drain", type=float, default=15.0, help="most seconds the open streams get to finish")
    ap.add_argument("--pieces", default="50:100", help="pieces per answer, LOW:HIGH (uniform)")
    ap.add_argument("--delay", type=float, default=0.03, help="seconds between pieces (50-100 at 0.03: 1.5-3 s)")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    ap.add_argument("--out", type=Path, default=Path("results/soak"))
    ap.add_argument("--client-of", help=argparse.SUPPRESS)  # internal: run as the client process
    ap.add_argument("--progress", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--go", type=Path, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.client_of:
        return client_main(a.client_of, a.streams, a.duration, a.drain, a.progress, a.go)
    try:
        low, high = (int(x) for x in a.pieces.split(":"))
    except ValueError:
        ap.error("--pieces must be LOW:HIGH, e.g. 50:100")
    warm_ok = a.warmup is None or 0 < a.warmup < a.duration
    if not (1 <= a.streams <= 4096 and a.duration > 0 and warm_ok and a.drain >= 0 and 3 <= low <= high <= MAX_PIECES):
        ap.error(f"need 1 <= streams <= 4096, duration > 0, 0 < warmup < duration, drain >= 0, "
                 f"3 <= LOW <= HIGH <= {MAX_PIECES}")  # fmt: skip
    if not (a.delay >= 0 and a.interval > 0):
        ap.error("need delay >= 0 and interval > 0")
    config = SoakConfig(a.streams, a.duration, a.warmup, a.drain, (low, high), a.delay, a.interval, a.out)
    try:
        summary = run_soak(config)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    report(summary, config.out)
    return 0 if summary["complete"] else 130 if summary["note"] == "interrupted" else 1


if __name__ == "__main__":
    sys.exit(main())
