"""Scale-out benchmark (issue 18): 1, 2 and 3 ``stopgate serve`` replicas behind HAProxy, sharing one Redis.

    python -m loadtest.scale                        # 1, 2, 3 shared replicas and 3 independent ones
    python -m loadtest.scale --replicas 1 3 --seconds 10 --concurrency 16

Everything runs on loopback as child processes: a real ``redis-server``, an
engine, the replicas and HAProxy (round robin, health-checked on ``/ready``).
Per configuration it runs one closed-loop phase of gold-sample requests
(every request names a reference item, so every request is an EM sample) and
reports throughput, p50 and p99 latency, non-200 answers, and the
controller's convergence: the samples the route's controller took until it
first settled (``state.settled``), read from the admin API every 0.2 s.

The engine is the scripted fake with a budget-sensitive answer: each request
thinks for a random 10-50 tokens; a generation cut off by the budget is made
to answer (the gateway's forced answer) and that answer is wrong. So EM at
budget ``b`` is the share of requests that think at most ``b`` tokens, and the
controller has a real budget to find (about 42 for the target 0.8).

``independent`` is the case the issue starts from: three replicas, each with
its own in-memory controller. Each settles on its own third of the traffic, so
the fleet scores about three times the samples before all three agree (if they
do), and spends three replicas' canary rates.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from gateway.engine.embedded import free_port
from loadtest.common import percentile
from loadtest.redis_server import RedisServer
from loadtest.replicas import REPO, Child, _spawn, haproxy, replica, wait_http

ADMIN_KEY = "scale-admin-key-0123456789"
ITEMS = 50
THINK = (10, 50)


@dataclass
class Result:
    config: str
    replicas: int
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    settled_after: int | None  # samples the controller took until it first settled (fleet-wide total)
    budget: int | None  # the budget at the end (or each independent replica's, joined)
    budgets: list[int]


def engine_main(port: int, seed: int) -> None:
    """The budget-sensitive fake engine (``python -m loadtest.scale engine --port P``)."""
    import uvicorn

    from loadtest.fake_engine import FakeEngine, Script, reasoning_pieces

    rng = random.Random(seed)
    engine = FakeEngine()
    engine.record = False

    def respond(request: dict[str, Any], headers: dict[str, str]) -> Script:
        prompt = request.get("prompt")
        if isinstance(prompt, str) and prompt.rstrip().endswith("####"):
            return Script(pieces=[" 4"])  # a forced answer: the reasoning was cut short, the answer is wrong
        return Script(pieces=reasoning_pieces(rng.randint(*THINK) + 3))

    engine.responder = respond
    uvicorn.run(engine, host="127.0.0.1", port=port, log_level="warning")


def write_routes(directory: Path) -> Path:
    refs = directory / "scale-refs.jsonl"
    items = [{"id": f"s{i}", "prompt": f"Q: {i}+3=?\n", "answers": ["3"], "route": "arith"} for i in range(ITEMS)]
    refs.write_text("".join(json.dumps(item) + "\n" for item in items))
    routes = yaml.safe_load((REPO / "gateway" / "routes.yaml").read_text())
    arith = routes["routes"]["arith"]
    arith["budget"] = 64
    arith["default_max_tokens"] = 80  # what the load sends: a gold sample steers only at the route's settings
    arith["control"] = {"target": 0.8, "min_budget": 8, "max_budget": 64}
    arith["evaluation"] = {"references": [str(refs)], "canary_per_minute": 0, "shadow_share": 0.0}
    routes["routes"] = {"arith": arith}
    path = directory / "routes.yaml"
    path.write_text(yaml.safe_dump(routes))
    return path


async def _state(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    r = await client.get(f"{url}/admin/routes/arith", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    out: dict[str, Any] = r.json()["controller"]["state"]
    return out


async def drive(
    target: str, admins: list[str], seconds: float, concurrency: int, shared: bool
) -> tuple[list[float], int, float, int | None]:
    """Closed loop for ``seconds``; watch convergence on the admin API. Returns latencies, errors, wall, settled."""
    latencies: list[float] = []
    errors = 0
    settled_after: int | None = None
    stop = time.monotonic() + seconds
    rng = random.Random(7)
    limits = httpx.Limits(max_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def worker() -> None:
            nonlocal errors
            while time.monotonic() < stop:
                item = rng.randrange(ITEMS)
                body = {"model": "arith", "prompt": f"Q: {item}+3=?\n", "reference_id": f"s{item}", "max_tokens": 80}
                t0 = time.perf_counter()
                try:
                    r = await client.post(f"{target}/v1/completions", json=body)
                    kind = None if r.status_code == 200 else f"HTTP {r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as exc:
                    kind = f"{type(exc).__name__}: {exc}"
                latencies.append(time.perf_counter() - t0)
                if kind is not None:
                    errors += 1
                    print(f"request failed: {kind}", file=sys.stderr)

        async def watch() -> None:
            nonlocal settled_after
            settled: dict[str, int] = {}
            while time.monotonic() < stop and settled_after is None:
                await asyncio.sleep(0.2)
                states = [await _state(client, url) for url in admins]
                for url, state in zip(admins, states, strict=True):
                    if state["settled"] and url not in settled:
                        settled[url] = state["samples"]
                if shared and settled:
                    settled_after = min(settled.values())
                elif len(settled) == len(admins):  # independent: every controller settled; samples fleet-wide
                    settled_after = sum(s["samples"] for s in states)

        start = time.monotonic()
        await asyncio.gather(watch(), *(worker() for _ in range(concurrency)))
        return latencies, errors, time.monotonic() - start, settled_after


def run_config(name: str, n: int, shared: bool, args: argparse.Namespace, root: Path) -> Result:
    logs = root / name
    logs.mkdir(parents=True)
    redis = RedisServer(logs / "redis")
    children: list[Child] = []
    try:
        redis.start()
        port = free_port()
        engine_args = [sys.executable, "-m", "loadtest.scale", "engine", "--port", str(port)]
        engine_log = logs / "engine.log"
        engine = Child("engine", f"http://127.0.0.1:{port}", _spawn("engine", engine_args, engine_log), engine_log)
        children.append(engine)
        wait_http(engine, "/v1/models")
        routes = write_routes(logs)
        env = {"STOPGATE_ADMIN_KEY": ADMIN_KEY, "STOPGATE_EVAL_SHARE": "0"}
        if not shared:
            env["STOPGATE_STATE_PATH"] = ":memory:"
        state_url = redis.url if shared else ""  # "": each replica its own in-memory controller
        for i in range(n):
            children.append(
                replica(f"replica-{i}", logs, upstream=engine.url, routes=routes, state_url=state_url, env=env)
            )
        replicas = children[1:]
        for r in replicas:
            wait_http(r, "/ready")
        lb = haproxy(logs, [r.url for r in replicas])
        children.append(lb)
        latencies, errors, wall, settled = asyncio.run(
            drive(lb.url, [r.url for r in replicas], args.seconds, args.concurrency, shared)
        )
        budgets = [asyncio.run(_one_state(r.url))["budget"] for r in replicas]
        return Result(
            name,
            n,
            len(latencies),
            errors,
            round(wall, 1),
            round(len(latencies) / wall, 1),
            round(percentile(latencies, 50) * 1000, 1),
            round(percentile(latencies, 99) * 1000, 1),
            settled,
            budgets[0] if len(set(budgets)) == 1 else None,
            budgets,
        )
    finally:
        for child in reversed(children):
            child.stop()
        redis.stop()


async def _one_state(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=30) as client:
        return await _state(client, url)


def table(results: list[Result]) -> str:
    lines = [
        "| configuration | replicas | requests | non-200 | req/s | p50 ms | p99 ms | samples to settle | budget |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        settle = "not within the run" if r.settled_after is None else str(r.settled_after)
        budget = str(r.budget) if r.budget is not None else "/".join(map(str, r.budgets))
        lines.append(
            f"| {r.config} | {r.replicas} | {r.requests} | {r.errors} | {r.rps} | {r.p50_ms} | {r.p99_ms} "
            f"| {settle} | {budget} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["engine"]:
        p = argparse.ArgumentParser(prog="loadtest.scale engine")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--seed", type=int, default=0)
        a = p.parse_args(argv[1:])
        engine_main(a.port, a.seed)
        return 0
    p = argparse.ArgumentParser(prog="python -m loadtest.scale", description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3], help="shared-store replica counts")
    p.add_argument("--independent", type=int, default=3, help="also run N replicas with their own controllers (0: no)")
    p.add_argument("--seconds", type=float, default=20.0, help="length of each configuration's load phase")
    p.add_argument("--concurrency", type=int, default=16, help="closed-loop clients")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if not 1 <= args.concurrency <= 256 or not 1 <= args.seconds <= 600 or not all(1 <= n <= 8 for n in args.replicas):
        p.error("need 1 <= --concurrency <= 256, 1 <= --seconds <= 600, 1 <= --replicas <= 8")
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="stopgate-scale-") as tmp:
        configs = [(f"shared x{n}", n, True) for n in args.replicas]
        if args.independent:
            configs.append((f"independent x{args.independent}", args.independent, False))
        for name, n, shared in configs:
            print(f"running {name} ...", file=sys.stderr)
            results.append(run_config(name.replace(" ", "-"), n, shared, args, Path(tmp)))
            print(table(results[-1:]).splitlines()[-1], file=sys.stderr)
    print(table(results))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
