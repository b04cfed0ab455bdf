"""Gateway overhead benchmark: the gateway beside the fake engine it fronts, in one run.

Starts the fake engine and the gateway as shipped (``stopgate serve``) as child processes on
loopback and drives both with one client, interleaved so that machine noise hits both alike.
Non-streaming, open loop: Poisson (seeded) or fixed arrivals at ``--rate``/s per target in
alternating ``--block``-second blocks; direct is a streaming request with the body the gateway
would send the engine, read to the end; latency counts from the scheduled send time.
Streaming, closed loop at concurrency 1 in ABBA order: added time per chunk is
(p50 gateway - p50 direct) / ``--chunks``. CPU time per process is reported too.

    python -m loadtest.overhead [--rate 200 --duration 10 --chunks 200 --out results/overhead.json]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import ctypes
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import numpy as np

from gateway.engine.embedded import free_port
from loadtest.common import EMBEDDED_ENV

try:  # the client's own cost lands on the same CPUs as the servers; uvloop keeps it small
    from uvloop import run as run_loop
except ImportError:
    from asyncio import run as run_loop  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parent.parent
MODEL, PROMPT = "tinyreason", "What is 1+2?"
SHORT_TOKENS = 10  # pieces per non-streaming answer, as in the fake engine's default script
TARGETS = {"added_p50_ms": 1.0, "added_p99_ms": 5.0, "added_us_per_chunk": 50.0}
JSON_HEADERS = {"content-type": "application/json"}
MAX_IN_FLIGHT = 256  # half the client's connection pool
Popen = subprocess.Popen[bytes]


@dataclass(frozen=True)
class Target:
    name: str  # "direct" or "gateway"
    url: str
    body: bytes


@dataclass(frozen=True)
class Sample:
    phase: str
    target: str
    at_s: float  # scheduled send time since the phase began
    latency_ms: float
    lag_ms: float  # how late the client sent it
    error: str  # "" when the request succeeded


def targets(engine: str, gateway: str, tokens: int, *, stream: bool) -> tuple[Target, Target]:
    """Direct gets the body that gateway/stopping/session.py:upstream_body would send; gateway gets a client's."""
    client = {"model": MODEL, "prompt": PROMPT, "max_tokens": tokens, "stream": stream}
    upstream = {**client, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    return (
        Target("direct", f"{engine}/v1/completions", json.dumps(upstream).encode()),
        Target("gateway", f"{gateway}/v1/completions", json.dumps(client).encode()),
    )


async def send(client: httpx.AsyncClient, target: Target, phase: str, at_s: float, due: float) -> Sample:
    """One request read to its last byte; latency counts from ``due`` (a perf_counter time)."""
    now = time.perf_counter()
    lag, due = max(0.0, now - due), max(due, now)  # a timer that fires early must not shorten latency
    error = ""
    try:
        async with client.stream("POST", target.url, content=target.body, headers=JSON_HEADERS) as response:
            async for _ in response.aiter_raw():
                pass
            error = "" if response.status_code == 200 else f"HTTP {response.status_code}"
    except httpx.HTTPError as exc:
        error = type(exc).__name__
    return Sample(phase, target.name, at_s, (time.perf_counter() - due) * 1e3, lag * 1e3, error)


async def open_loop(
    client: httpx.AsyncClient, pair: tuple[Target, Target], a: argparse.Namespace, phase: str, seconds: float
) -> list[Sample]:
    """Arrivals at ``a.rate`` for ``seconds`` per target; block k of ``a.block`` s goes to ``pair[k % 2]``.

    An arrival that finds MAX_IN_FLIGHT requests outstanding is shed (an error), so an overloaded
    server cannot drive the client into httpx's pool, whose bookkeeping is quadratic in waiters.
    """
    rng, schedule, t = random.Random(a.seed), [], 0.0
    while (t := t + (rng.expovariate(a.rate) if a.arrivals == "poisson" else 1.0 / a.rate)) < 2 * seconds:
        schedule.append(t)
    start, tasks, shed, in_flight = time.perf_counter(), [], [], [0]

    async def tracked(target: Target, at: float) -> Sample:
        try:
            return await send(client, target, phase, at, start + at)
        finally:
            in_flight[0] -= 1

    for at in schedule:
        if (delay := start + at - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        target = pair[int(at // a.block) % 2]
        if in_flight[0] >= MAX_IN_FLIGHT:
            shed.append(Sample(phase, target.name, at, float("nan"), 0.0, "shed: too many in flight"))
            continue
        in_flight[0] += 1
        tasks.append(asyncio.create_task(tracked(target, at)))
    return sorted([*await asyncio.gather(*tasks), *shed], key=lambda s: s.at_s)


async def closed_loop(client: httpx.AsyncClient, pair: tuple[Target, Target], n: int, phase: str) -> list[Sample]:
    """Concurrency 1, ABBA order, so neither target always goes first."""
    samples, start = [], time.perf_counter()
    for i in range(n):
        for target in pair if i % 2 == 0 else pair[::-1]:
            now = time.perf_counter()
            samples.append(await send(client, target, phase, now - start, now))
    return samples


def cpu_now(engine: Popen, gateway: Popen) -> dict[str, float]:
    """Wall clock, CPU seconds so far of each process (/proc/<pid>/stat) and of the whole machine (/proc/stat)."""

    def cpu_s(pid: int) -> float:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")

    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    machine = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    now = {"wall": time.perf_counter(), "client": time.process_time(), "machine": machine}
    return now | {"engine": cpu_s(engine.pid), "gateway": cpu_s(gateway.pid)}


def stats(samples: list[Sample], target: str, seconds: float | None = None) -> dict[str, Any]:
    mine = [s for s in samples if s.target == target]
    ok = np.array([s.latency_ms for s in mine if not s.error] or [np.nan])
    out: dict[str, Any] = {f"p{q}_ms": float(np.percentile(ok, q)) for q in (50, 90, 99)}
    out |= {"max_ms": float(ok.max()), "lag_p99_ms": float(np.percentile([s.lag_ms for s in mine] or [np.nan], 99))}
    out |= {"requests": len(mine), "errors": sum(1 for s in mine if s.error)}
    out["shed"] = sum(1 for s in mine if s.error.startswith("shed"))
    if seconds:
        out["achieved_rps"] = (len(mine) - out["errors"]) / seconds
    return out


def summarize(samples: list[Sample], cpu: tuple[dict[str, float], dict[str, float]], seconds: float | None) -> Any:
    """Latency percentiles per target, and the cores each process kept busy (2.0 in all: saturated)."""
    out: dict[str, Any] = {t: stats(samples, t, seconds) for t in ("direct", "gateway")}
    wall = cpu[1]["wall"] - cpu[0]["wall"]
    out["cores_busy"] = {k: (cpu[1][k] - cpu[0][k]) / wall for k in ("client", "engine", "gateway", "machine")}
    out["gateway_cpu_s"] = cpu[1]["gateway"] - cpu[0]["gateway"]
    lag = max(out["direct"]["lag_p99_ms"], out["gateway"]["lag_p99_ms"])
    shed = any(s.error.startswith("shed") for s in samples)
    out["overloaded"] = bool(out["cores_busy"]["machine"] > 0.85 * (os.cpu_count() or 1) or lag > 10.0 or shed)
    return out


async def wait_ready(client: httpx.AsyncClient, url: str, proc: Popen, name: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"overhead: the {name} exited with code {proc.returncode}; see logs/overhead/")
        try:
            if (await client.get(url, timeout=1.0)).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.1)
    raise SystemExit(f"overhead: {url} was not ready within 30 s; see logs/overhead/")


async def sanity(client: httpx.AsyncClient, pair: tuple[Target, Target], tokens: int) -> None:
    """Both paths carry the whole answer, checked before anything is timed."""
    direct, gateway = [await client.post(t.url, content=t.body, headers=JSON_HEADERS) for t in pair]
    direct_ok = direct.text.endswith("data: [DONE]\n\n") and direct.text.count('"text": "x"') == tokens
    if gateway.headers.get("content-type", "").startswith("text/event-stream"):
        gateway_ok = gateway.text.endswith("data: [DONE]\n\n") and gateway.text.count('"text":"x"') == tokens
    else:
        gateway_ok = gateway.status_code == 200 and gateway.json()["choices"][0]["text"] == "x" * tokens
    if not (direct_ok and gateway_ok):
        raise SystemExit(f"overhead: unexpected answer: {direct.text[:200]!r} / {gateway.text[:200]!r}")


async def bench(a: argparse.Namespace, engine: Popen, gateway: Popen, budget_s: float) -> Any:
    this = asyncio.current_task()
    assert this is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, this.cancel)  # SIGTERM ends the run cleanly
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    timeout = httpx.Timeout(connect=5.0, read=30.0, write=5.0, pool=5.0)
    async with asyncio.timeout(budget_s), httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        await wait_ready(client, f"{a.engine_url}/health", engine, "fake engine")
        await wait_ready(client, f"{a.gateway_url}/ready", gateway, "gateway")
        short = targets(a.engine_url, a.gateway_url, SHORT_TOKENS, stream=False)
        long = targets(a.engine_url, a.gateway_url, a.chunks, stream=True)
        await sanity(client, short, SHORT_TOKENS)
        await sanity(client, long, a.chunks)
        await open_loop(client, short, a, "warmup", a.warmup)
        cpu0 = cpu_now(engine, gateway)
        open_samples = await open_loop(client, short, a, "open_loop", a.duration)
        ns = summarize(open_samples, (cpu0, cpu_now(engine, gateway)), a.duration)
        await closed_loop(client, long, 10, "warmup")
        cpu0 = cpu_now(engine, gateway)
        stream_samples = await closed_loop(client, long, a.stream_requests, "streaming")
        st = summarize(stream_samples, (cpu0, cpu_now(engine, gateway)), None)
    ns["added_p50_ms"] = ns["gateway"]["p50_ms"] - ns["direct"]["p50_ms"]
    ns["added_p99_ms"] = ns["gateway"]["p99_ms"] - ns["direct"]["p99_ms"]
    ns["gateway_cpu_us_per_request"] = (
        ns.pop("gateway_cpu_s") * 1e6 / (ns["gateway"]["requests"] - ns["gateway"]["shed"])
    )
    st["added_us_per_chunk"] = (st["gateway"]["p50_ms"] - st["direct"]["p50_ms"]) * 1e3 / a.chunks
    by = {t: np.array([s.latency_ms for s in stream_samples if s.target == t]) for t in ("direct", "gateway")}
    st["paired_median_added_us_per_chunk"] = float(np.median(by["gateway"] - by["direct"])) * 1e3 / a.chunks
    st["gateway_cpu_us_per_chunk"] = st.pop("gateway_cpu_s") * 1e6 / (a.stream_requests * a.chunks)
    measured = {k: (ns | st)[k] for k in TARGETS}
    # An overloaded phase gives no verdict, unless the gateway alone cannot serve the offered rate on a core.
    ceiling = 1e6 / ns["gateway_cpu_us_per_request"]
    verdicts: dict[str, bool | None] = {k: bool(v <= TARGETS[k]) for k, v in measured.items()}
    for k in TARGETS:
        if (ns if k.startswith("added_p") else st)["overloaded"]:
            verdicts[k] = False if k.startswith("added_p") and ceiling < a.rate else None
    checks = {k: {"measured": v, "limit": TARGETS[k], "pass": verdicts[k]} for k, v in measured.items()}
    ns["gateway_max_rps_per_core"] = ceiling
    return {"non_streaming": ns, "streaming": st, "targets": checks}, open_samples + stream_samples


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it should this benchmark die without cleaning up."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@contextmanager
def child(cmd: list[str], log: Path, env: dict[str, str]) -> Iterator[Popen]:
    """A child in its own session (a terminal's Ctrl-C reaches only us), logging to ``log``; always ended."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent,
        )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def table(title: str, phase: dict[str, Any], keys: tuple[str, ...], cpu: str) -> None:
    print(f"\n{title}\n  {'':16}{'direct':>10}{'gateway':>10}{'added':>10}")
    for key in keys:
        d, g = phase["direct"][key], phase["gateway"][key]
        added = f"{g - d:.2f}" if key[0] == "p" else ""
        print(f"  {key:16}{d:>10.{2 * isinstance(d, float)}f}{g:>10.{2 * isinstance(g, float)}f}{added:>10}")
    print(f"  {cpu}; cores busy: " + ", ".join(f"{k} {v:.2f}" for k, v in phase["cores_busy"].items()))
    if phase["overloaded"]:
        print("  WARNING: the machine was saturated (>85% of its cores), the client fell >10 ms behind or shed load:"
              "\n  these numbers measure an overloaded box, not the gateway alone")  # fmt: skip


def report(result: dict[str, Any]) -> None:
    ns, st, c = result["non_streaming"], result["streaming"], result["config"]
    keys = ("p50_ms", "p90_ms", "p99_ms", "max_ms", "lag_p99_ms", "achieved_rps", "errors", "shed")
    table(f"non-streaming, open loop: {c['rate']:g} req/s per target ({c['arrivals']}, seed {c['seed']}), "
          f"{c['duration']:g} s each in {c['block']:g} s blocks, {SHORT_TOKENS} tokens per answer", ns, keys,
          f"gateway CPU per request {ns['gateway_cpu_us_per_request']:.0f} us (so at most "
          f"{ns['gateway_max_rps_per_core']:.0f} req/s per process)")  # fmt: skip
    table(f"streaming, closed loop, concurrency 1: {c['stream_requests']} requests per target, "
          f"{c['chunks']} chunks each", st, ("p50_ms", "p90_ms", "p99_ms", "errors"),
          f"gateway CPU per chunk {st['gateway_cpu_us_per_chunk']:.1f} us")  # fmt: skip
    print(f"  added per chunk at p50: {st['added_us_per_chunk']:.1f} us "
          f"(median of ABBA pairs: {st['paired_median_added_us_per_chunk']:.1f} us)")  # fmt: skip
    print(f"\ntargets ({c['cpus']} CPUs; gateway code {c['gateway_code']}; {c['gateway_config']})")
    for name, t in result["targets"].items():
        unit = "us" if name.endswith("chunk") else "ms"
        verdict = {True: "PASS", False: "FAIL", None: "NO VERDICT (overloaded by something else)"}[t["pass"]]
        if t["pass"] is False and ns["overloaded"] and name.startswith("added_p"):
            verdict += f" (the gateway's CPU alone caps it at {ns['gateway_max_rps_per_core']:.0f} req/s)"
        print(f"  {name:20}{t['measured']:>9.2f} {unit} <= {t['limit']:g} {unit}  {verdict}")


def run(a: argparse.Namespace) -> tuple[dict[str, Any], list[Sample]]:
    engine_port, gateway_port, py = free_port(), free_port(), sys.executable
    a.engine_url, a.gateway_url = f"http://127.0.0.1:{engine_port}", f"http://127.0.0.1:{gateway_port}"
    env = {**os.environ, **EMBEDDED_ENV, "STOPGATE_LOG_LEVEL": a.log_level, "PYTHONUNBUFFERED": "1"}  # as `make serve`
    engine_cmd = [py, "-m", "loadtest.fake_engine", "--port", str(engine_port), "--tokens", str(a.chunks)]
    gateway_cmd = [py, "-m", "gateway.cli", "serve", "--upstream", a.engine_url, "--port", str(gateway_port)]
    access_log = "on" if a.log_level in ("debug", "info") else "off"  # uvicorn logs each request at info
    config = {
        **{k: v for k, v in vars(a).items() if k != "out"},
        "gateway_command": " ".join(gateway_cmd),
        "gateway_config": f"`stopgate serve`, STOPGATE_LOG_LEVEL={a.log_level}, uvicorn access log {access_log}",
        "stopgate_env": {k: v for k, v in env.items() if k.startswith("STOPGATE_")},
        "short_tokens": SHORT_TOKENS,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "client_loop": run_loop.__module__,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "gateway_code": subprocess.run(  # -dirty: tracked files had uncommitted changes
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True, check=False
        ).stdout.strip(),
    }
    budget = 60 + 2 * (a.duration + a.warmup) + a.stream_requests  # seconds; a healthy run needs far less
    logs = ROOT / "logs" / "overhead"
    with child(engine_cmd, logs / "engine.log", env) as engine, child(gateway_cmd, logs / "gateway.log", env) as gw:
        result, samples = run_loop(bench(a, engine, gw, budget))
    return {"config": config, **result}, samples


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rate", type=float, default=200.0, help="non-streaming arrivals per second, per target")
    ap.add_argument("--duration", type=float, default=10.0, help="measured open-loop seconds per target")
    ap.add_argument("--block", type=float, default=1.0, help="seconds per alternating target block")
    ap.add_argument("--arrivals", choices=("poisson", "fixed"), default="poisson")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--warmup", type=float, default=2.0, help="unmeasured open-loop seconds per target")
    ap.add_argument("--chunks", type=int, default=200, help="pieces per streamed answer (the route allows <= 480)")
    ap.add_argument("--stream-requests", type=int, default=200, help="streamed requests per target")
    levels = ("debug", "info", "warning", "error")
    ap.add_argument("--log-level", default="info", choices=levels, help="gateway STOPGATE_LOG_LEVEL (shipped: info)")
    ap.add_argument("--out", type=Path, default=Path("results/overhead.json"))
    a = ap.parse_args(argv)
    if not (a.rate > 0 and a.duration >= a.block > 0 and 1 <= a.chunks <= 480 and 1 <= a.stream_requests <= 10_000):
        ap.error("need rate > 0, duration >= block > 0, 1 <= chunks <= 480, 1 <= stream-requests <= 10000")
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        result, samples = run(a)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("overhead: interrupted; engine and gateway stopped", file=sys.stderr)
        return 130
    except TimeoutError:
        print("overhead: the run overran its time budget; engine and gateway stopped", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    report(result)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    with open(a.out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(Sample)])
        writer.writeheader()
        writer.writerows(asdict(s) for s in samples)
    print(f"\nwrote {a.out} (summary) and {a.out.with_suffix('.csv')} ({len(samples)} requests)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
