"""Peer benchmark (issue 17): the engine direct, stopgate and the LiteLLM proxy side by side, in one run.

One minimal upstream (``loadtest/peer_upstream.py``: ``--tokens`` one-token chunks) serves every
target: (a) itself, direct; (b) ``stopgate serve --upstream`` as a child process, one entry per
``--workers`` value (a value above 1 runs ``serve --workers N``, and is skipped with a message
where ``serve`` has no such flag); (c) the LiteLLM proxy, a pinned release in a virtualenv of its
own (``loadtest/litellm_proxy.py``), with a ``model_list`` that points at the same upstream.

wrk (one thread, a POST script) drives one target at a time: at ``--connections`` for throughput,
and at one connection for latency (wrk's own distribution), each non-streaming and streaming.
Machine noise is shared out: every round runs every phase on every target, one after the other,
in an order rotated each round, and the report gives the median over rounds. Around every wrk run
the CPU time of each server's process tree is read from /proc, so each target's CPU per request
is its own, and the upstream's share behind a proxy is shown too; per chunk is per one-token
piece of the answer (a non-streaming answer counts ``--tokens`` chunks). wrk's own CPU and the
machine's busy cores are reported, to show that the load generator is not the limit.

    python -m loadtest.peer [--rounds 3 --seconds 8 --workers 1 2 --out results/peer]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from gateway.engine.embedded import free_port
from loadtest import litellm_proxy, proc_cpu, wrk
from loadtest.common import EMBEDDED_ENV
from loadtest.overhead import Popen, child
from loadtest.peer_report import ENGINE, plot, report

ROOT = Path(__file__).resolve().parent.parent
MODEL, PROMPT = "tinyreason", "What is 1+2?"
LITELLM = "litellm"


@dataclass(frozen=True)
class Phase:
    """One load shape: non-streaming (``json``) or streaming, at a number of connections."""

    stream: bool
    connections: int

    @property
    def name(self) -> str:
        return f"{'stream' if self.stream else 'json'}@{self.connections}"


@dataclass(frozen=True)
class Target:
    name: str  # "engine", "stopgate", "stopgate-2w", "litellm"
    url: str  # base URL, no path
    pid: int


@dataclass(frozen=True)
class Run:
    """One wrk run on one target in one round, with every server's CPU seconds over it."""

    round: int
    phase: str
    target: str
    wall_s: float
    wrk: wrk.WrkResult
    cpu_s: dict[str, float]  # server name -> CPU seconds of its process tree during the run
    machine_busy_s: float
    settle_s: float = 0.0  # how long the target took to go quiet after wrk left (work on abandoned requests)


def phases(connections: int) -> list[Phase]:
    return [Phase(False, connections), Phase(True, connections), Phase(False, 1), Phase(True, 1)]


def request_body(tokens: int, *, stream: bool, chat: bool) -> bytes:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": tokens, "stream": stream}
    body |= {"messages": [{"role": "user", "content": PROMPT}]} if chat else {"prompt": PROMPT}
    return json.dumps(body).encode()


def answer_text(raw: bytes, *, stream: bool, chat: bool) -> str:
    """The answer's text from a whole response body (an SSE stream or one JSON object)."""
    if not stream:
        choice = json.loads(raw)["choices"][0]
        return str(choice["message"]["content"] if chat else choice["text"])
    text, done = [], False
    for line in raw.decode().splitlines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            continue
        for choice in json.loads(data).get("choices") or []:
            text.append((choice.get("delta") or {}).get("content") or "" if chat else choice.get("text") or "")
    if not done:
        raise ValueError("the stream did not end with data: [DONE]")
    return "".join(text)


def rotated(items: Sequence[str], k: int) -> list[str]:
    """``items`` rotated left by ``k``, so that no target always runs first in a round."""
    k %= len(items) or 1
    return [*items[k:], *items[:k]]


def schedule(targets: Sequence[str], rounds: int, connections: int) -> Iterator[tuple[int, Phase, str]]:
    """(round, phase, target) in run order: every round runs every phase on every target."""
    for r in range(rounds):
        for phase in phases(connections):
            for name in rotated(targets, r):
                yield r, phase, name


def measure(
    target: Target, phase: Phase, body: bytes, path: str, pids: dict[str, int], r: int, seconds: float, timeout_s: float
) -> Run:
    """One wrk run in round ``r``, with the CPU of every server tree and of the machine read just before and after."""
    before, busy0, t0 = proc_cpu.snapshot(), proc_cpu.machine_busy_s(), time.perf_counter()
    result = wrk.run(target.url + path, body, connections=phase.connections, seconds=seconds, timeout_s=timeout_s)
    after, busy1, t1 = proc_cpu.snapshot(), proc_cpu.machine_busy_s(), time.perf_counter()
    cpu = {n: proc_cpu.tree_cpu_s(pid, after) - proc_cpu.tree_cpu_s(pid, before) for n, pid in pids.items()}
    return Run(r, phase.name, target.name, t1 - t0, result, cpu, busy1 - busy0, settle(target.pid))


def settle(pid: int, quiet_cores: float = 0.05, step_s: float = 0.25, limit_s: float = 20.0) -> float:
    """Wait until ``pid``'s tree uses under ``quiet_cores`` for one step, so that a server still working on
    requests wrk abandoned does not spend the next run's CPU; the seconds that took."""
    start = time.perf_counter()
    last = proc_cpu.tree_cpu_s(pid, proc_cpu.snapshot())
    while time.perf_counter() - start < limit_s:
        time.sleep(step_s)
        now = proc_cpu.tree_cpu_s(pid, proc_cpu.snapshot())
        if now - last < quiet_cores * step_s:
            break
        last = now
    return time.perf_counter() - start


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if v == v]  # drop NaN
    return statistics.median(finite) if finite else float("nan")


def summarize(runs: Sequence[Run], tokens: int) -> dict[str, dict[str, dict[str, Any]]]:
    """Per phase and target: medians over rounds; errors summed. Added latency is per round against the engine.

    CPU per request is the tree's CPU over the run divided by the answers completed in it, so it also
    holds the work on the requests still in flight when wrk stopped (up to one per connection):
    ``in_flight_share`` (connections / completed) bounds that overstatement; over 0.1 the report warns.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    engine_p50 = {(r.round, r.phase): r.wrk.p50_ms for r in runs if r.target == ENGINE}
    for phase in dict.fromkeys(r.phase for r in runs):
        out[phase] = {}
        for name in dict.fromkeys(r.target for r in runs if r.phase == phase):
            mine = [r for r in runs if r.phase == phase and r.target == name]
            per_req = [r.cpu_s.get(name, 0.0) * 1e3 / r.wrk.ok if r.wrk.ok else float("nan") for r in mine]
            upstream = [r.cpu_s.get(ENGINE, 0.0) * 1e3 / r.wrk.ok if r.wrk.ok else float("nan") for r in mine]
            connections = int(phase.rsplit("@", 1)[1])
            row: dict[str, Any] = {
                "rounds": len(mine),
                "in_flight_share": _median([connections / r.wrk.ok if r.wrk.ok else float("inf") for r in mine]),
                "settle_s": _median([r.settle_s for r in mine]),
                "rps": _median([r.wrk.rps for r in mine]),
                "cpu_ms_per_request": _median(per_req),
                "cpu_us_per_chunk": _median(per_req) * 1e3 / tokens,
                "cores_busy": _median([r.cpu_s.get(name, 0.0) / r.wall_s for r in mine]),
                "p50_ms": _median([r.wrk.p50_ms for r in mine]),
                "p99_ms": _median([r.wrk.p99_ms for r in mine]),
                "requests": sum(r.wrk.requests for r in mine),
                "non_2xx": sum(r.wrk.non_2xx for r in mine),
                "socket_errors": sum(r.wrk.socket_errors for r in mine),
                "timeouts": sum(r.wrk.timeouts for r in mine),
                "errors": sum(r.wrk.errors for r in mine),
                "wrk_cores_busy": _median([r.wrk.wrk_cpu_s / r.wall_s for r in mine]),
                "wrk_cpu_us_per_request": _median(
                    [r.wrk.wrk_cpu_s * 1e6 / r.wrk.ok if r.wrk.ok else float("nan") for r in mine]
                ),
                "machine_cores_busy": _median([r.machine_busy_s / r.wall_s for r in mine]),
            }
            if name != ENGINE:
                row["upstream_cpu_ms_per_request"] = _median(upstream)
                added = [r.wrk.p50_ms - engine_p50[(r.round, phase)] for r in mine if (r.round, phase) in engine_p50]
                row["added_p50_ms"] = _median(added)
            out[phase][name] = row
    return out


def ratios(summary: dict[str, dict[str, dict[str, Any]]], connections: int) -> dict[str, dict[str, float]]:
    """Each target's CPU per request over the engine's (issue 17's goal: <= 2x), and throughput over stopgate's."""
    stream, plain = summary.get(f"stream@{connections}", {}), summary.get(f"json@{connections}", {})
    out: dict[str, dict[str, float]] = {}
    engine_stream = stream.get(ENGINE, {}).get("cpu_ms_per_request", float("nan"))
    for name in {**stream, **plain}:
        if name == ENGINE:
            continue
        row = {
            "cpu_vs_engine_stream": stream.get(name, {}).get("cpu_ms_per_request", float("nan")) / engine_stream,
            # A non-streaming request through a gateway is one streamed engine request.
            "cpu_vs_engine_json_via_stream": plain.get(name, {}).get("cpu_ms_per_request", float("nan"))
            / engine_stream,
        }
        out[name] = row
    return out


# --- running the servers ---------------------------------------------------------------------------------------


def wait_ready(url: str, proc: Popen, name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"peer: {name} exited with code {proc.returncode}; see logs/peer/{name}.log")
        try:
            with urllib.request.urlopen(url, timeout=2.0) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"peer: {name} was not ready at {url} within {timeout_s:g} s; see logs/peer/{name}.log")


def sanity(target: Target, path: str, tokens: int, chat: bool) -> None:
    """Every target carries the whole answer, streamed and not, before anything is timed."""
    for stream in (False, True):
        body = request_body(tokens, stream=stream, chat=chat)
        request = urllib.request.Request(target.url + path, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30.0) as response:
            raw = response.read()
        if (text := answer_text(raw, stream=stream, chat=chat)) != "x" * tokens:
            raise SystemExit(f"peer: {target.name} answered {text!r} (stream={stream}): {raw[:300]!r}")


def serve_flags() -> str:
    """``stopgate serve --help``, to see which flags this checkout's serve has."""
    cmd = [sys.executable, "-m", "gateway.cli", "serve", "--help"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False).stdout


def start_all(a: argparse.Namespace, stack: ExitStack, logs: Path) -> tuple[list[Target], dict[str, str]]:
    """The upstream, then every target's server; those that cannot run here are returned as skipped."""
    py, skipped = sys.executable, {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    port = free_port()
    upstream_url = f"http://127.0.0.1:{port}"
    cmd = [py, "-m", "loadtest.peer_upstream", "--port", str(port), "--tokens", str(a.tokens)]
    engine = stack.enter_context(child(cmd, logs / f"{ENGINE}.log", env))
    wait_ready(f"{upstream_url}/health", engine, ENGINE, 30)
    targets = [Target(ENGINE, upstream_url, engine.pid)]
    ready: list[tuple[str, Popen, str, float]] = []
    has_workers = "--workers" in serve_flags()
    for n in a.workers:
        name = "stopgate" if n == 1 else f"stopgate-{n}w"
        if n > 1 and not has_workers:
            skipped[name] = "`stopgate serve` has no --workers flag in this checkout (issue 17 part 2)"
            print(f"peer: skipping {name}: {skipped[name]}", file=sys.stderr)
            continue
        port = free_port()
        cmd = [py, "-m", "gateway.cli", "serve", "--upstream", upstream_url, "--port", str(port), "--auth", "off"]
        cmd += ["--workers", str(n)] if has_workers else []  # explicit, so no STOPGATE_WORKERS in the env decides
        genv = {**env, **EMBEDDED_ENV}
        if n > 1:  # workers share one controller through a state file (an in-memory state is refused)
            genv["STOPGATE_STATE_PATH"] = str(Path(stack.enter_context(tempfile.TemporaryDirectory())) / "state.db")
        proc = stack.enter_context(child(cmd, logs / f"{name}.log", genv))
        targets.append(Target(name, f"http://127.0.0.1:{port}", proc.pid))
        ready.append((f"{targets[-1].url}/ready", proc, name, 60.0))
    if a.no_litellm:
        skipped[LITELLM] = "--no-litellm"
    else:
        try:
            python = litellm_proxy.ensure_venv(a.litellm_version)
        except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
            skipped[LITELLM] = f"could not install litellm[proxy]=={a.litellm_version}: {exc}"
            print(f"peer: skipping {LITELLM}: {skipped[LITELLM]}", file=sys.stderr)
            return _ready(targets, ready), skipped
        port = free_port()
        conf = litellm_proxy.config(upstream_url, MODEL, logs / "litellm.json")
        # No PYTHONPATH: nothing of this checkout in the proxy; the model cost map from its wheel, not the network.
        lenv = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        lenv["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
        proc = stack.enter_context(child(litellm_proxy.command(python, conf, port), logs / "litellm.log", lenv))
        targets.append(Target(LITELLM, f"http://127.0.0.1:{port}", proc.pid))
        ready.append((f"{targets[-1].url}/health/liveliness", proc, LITELLM, 180.0))
    return _ready(targets, ready), skipped


def _ready(targets: list[Target], waits: list[tuple[str, Popen, str, float]]) -> list[Target]:
    """``targets`` once every server in ``waits`` answers (they start side by side)."""
    for url, proc, name, timeout in waits:
        wait_ready(url, proc, name, timeout)
    return targets


def bench(a: argparse.Namespace) -> dict[str, Any]:
    chat = a.api == "chat"
    path = "/v1/chat/completions" if chat else "/v1/completions"
    bodies = {stream: request_body(a.tokens, stream=stream, chat=chat) for stream in (False, True)}
    logs = ROOT / "logs" / "peer"
    runs: list[Run] = []
    with ExitStack() as stack:
        targets, skipped = start_all(a, stack, logs)
        by_name = {t.name: t for t in targets}
        pids = {t.name: t.pid for t in targets}
        for t in targets:
            sanity(t, path, a.tokens, chat)
        if a.warmup > 0:
            for phase in phases(a.connections)[:2]:
                for t in targets:
                    wrk.run(t.url + path, bodies[phase.stream], connections=phase.connections, seconds=a.warmup)
        total = a.rounds * len(phases(a.connections)) * len(targets)
        for i, (r, phase, name) in enumerate(schedule([t.name for t in targets], a.rounds, a.connections), 1):
            run = measure(by_name[name], phase, bodies[phase.stream], path, pids, r, a.seconds, a.wrk_timeout)
            runs.append(run)
            print(
                f"[{i}/{total}] round {r + 1} {phase.name:10} {name:12} {run.wrk.rps:8.1f} req/s  "
                f"errors {run.wrk.errors}  p50 {run.wrk.p50_ms:.2f} ms",
                file=sys.stderr,
            )
        for t in targets:  # still whole after the load?
            sanity(t, path, a.tokens, chat)
    summary = summarize(runs, a.tokens)
    return {"summary": summary, "ratios": ratios(summary, a.connections), "skipped": skipped, "runs": runs}


def config(a: argparse.Namespace) -> dict[str, Any]:
    loop = "uvloop" if _importable("uvloop") else "asyncio"
    parser = "httptools" if _importable("httptools") else "h11"
    return {
        **{k: v for k, v in vars(a).items() if k != "out"},
        "workers": list(a.workers),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "upstream": f"loadtest/peer_upstream.py under uvicorn's defaults ({loop}, {parser})",
        "wrk": "one thread, POST script (loadtest/wrk.py), --timeout " + f"{a.wrk_timeout:g}s",
        "stopgate_env": dict(EMBEDDED_ENV),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average": os.getloadavg(),
        "gateway_code": subprocess.run(  # -dirty: tracked files had uncommitted changes
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True, check=False
        ).stdout.strip(),
    }


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the report gives medians)")
    ap.add_argument("--seconds", type=float, default=8.0, help="wrk seconds per phase, target and round (>= 1)")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured wrk seconds per target before round 1")
    ap.add_argument("--connections", type=int, default=32, help="connections of the throughput phases")
    ap.add_argument("--tokens", type=int, default=32, help="one-token chunks per answer")
    ap.add_argument("--api", choices=("completions", "chat"), default="completions")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="one stopgate target per value")
    ap.add_argument("--no-litellm", action="store_true", help="leave the LiteLLM proxy out")
    ap.add_argument("--litellm-version", default=litellm_proxy.VERSION)
    ap.add_argument("--wrk-timeout", type=float, default=10.0, help="wrk's per-request timeout in seconds")
    ap.add_argument("--out", type=Path, default=Path("results/peer"), help="folder for peer.json and peer.png")
    a = ap.parse_args(argv)
    if a.rounds < 1 or a.seconds < 1 or a.connections < 1 or not 1 <= a.tokens <= 480 or min(a.workers) < 1:
        ap.error("need rounds >= 1, seconds >= 1, connections >= 1, 1 <= tokens <= 480, workers >= 1")
    if wrk.wrk_binary() is None:
        ap.error("wrk is not installed (Debian: apt-get install wrk)")
    conf = config(a)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops the servers as Ctrl-C does
    try:
        result = bench(a)
    except KeyboardInterrupt:
        print("peer: interrupted; every server stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    runs = result.pop("runs")
    result = {"config": conf, **result, "runs": [asdict(r) for r in runs]}
    print(report(result))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "peer.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, a.out / "peer.png")
    print(f"\nwrote {a.out / 'peer.json'} and {a.out / 'peer.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
