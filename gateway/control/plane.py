"""The control plane: per route, the controller's state, its references and counters; admin operations.

EM samples come in through ``observe`` (from gateway/evaluation/sampler.py);
each state change is saved with its sample, and the route's budget and EM
are published as metrics. With replicas on a shared Redis (``fleet``, see
gateway/control/fleet.py) samples go to the route's shared log instead, and
the route's leader steps the controller. docs/controller.md tells the story.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.control.controller import (
    Controlled,
    ControllerConfig,
    ControllerState,
    Sample,
    initial_state,
    override_budget,
    retarget,
    state_from_dict,
    state_to_dict,
    step,
    wilson,
)
from gateway.control.shared import Shared, Versioned, unavailable_if_shared
from gateway.control.store import SampleRecord, Store
from gateway.errors import InvalidRequest, NotFound
from gateway.evaluation import (
    ReferenceIssue,
    ReferenceSet,
    ReferenceSetError,
    load_reference_file,
    parse_reference_lines,
)
from gateway.evaluation.matching import ReferenceIndex
from gateway.metrics import Metrics
from gateway.settings import ConfigError, RouteConfig, RoutesConfig, Settings

# Sources of EM samples.
GOLD, CANARY, SHADOW = "gold", "canary", "shadow"
# A stored reference set's body that records its deletion (a tombstone: the Store keeps its one write call).
DELETED = ""
# An operator's change: (state, config) -> (state, config).
Change = Callable[[ControllerState, ControllerConfig], tuple[ControllerState, ControllerConfig]]


@dataclass
class RouteControl:
    """One route's controller, references and counters."""

    route: RouteConfig
    config: ControllerConfig | None  # None: the route has no controller, only references
    state: ControllerState | None
    references: ReferenceIndex = field(default_factory=ReferenceIndex)
    counts: Counter[str] = field(default_factory=Counter)
    eval_tokens: Counter[str] = field(default_factory=Counter)
    live_tokens: int = 0

    def controlled(self) -> Controlled | None:
        if self.config is None or self.state is None:
            return None
        strictness = self.route.control.strictness if self.route.control is not None else None
        if strictness is None:
            return Controlled(self.state.budget)
        level = min(self.state.level, len(strictness.values) - 1)
        return Controlled(self.state.budget, level, strictness.param, strictness.values[level])


def controller_config(route: RouteConfig, target: float | None = None) -> ControllerConfig:
    control = route.control
    assert control is not None
    levels = len(control.strictness.values) if control.strictness is not None else 1
    fields: dict[str, Any] = {
        **control.params,
        "target": control.target if target is None else target,
        "min_budget": control.min_budget,
        "max_budget": route.max_budget,
        "levels": levels,
    }
    try:
        return ControllerConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"routes.{route.name}.control: {exc}") from exc


def load_route_references(route: RouteConfig) -> ReferenceIndex:
    """The route's reference sets from the routes file; a duplicate id across sets raises ValueError."""
    return ReferenceIndex(tuple(check_route(route, load_reference_file(path)) for path in route.evaluation.references))


def route_references(route: RouteConfig, stored: list[tuple[str, str]]) -> ReferenceIndex:
    """The route's sets from the routes file, then its uploaded sets (``(name, JSONL)``, in upload order)."""
    try:
        refs = load_route_references(route)
        for name, body in stored:
            if body == DELETED:  # deleted through the admin API (a routes-file set of that name too)
                refs = refs.without(name)
                continue
            refs = refs.replace(check_route(route, parse_reference_lines(name, body, source=f"stored {name!r}")))
    except (ReferenceSetError, ValueError) as exc:
        raise ConfigError(f"routes.{route.name}.evaluation.references: {exc}") from exc
    return refs


def check_route(route: RouteConfig, ref_set: ReferenceSet) -> ReferenceSet:
    """A set for ``route`` holds only items of that route: anything else is a mistake in the upload."""
    wrong = [
        ReferenceIssue(number, "route", f"item {item.id!r} belongs to route {item.route!r}, not {route.name!r}")
        for number, item in enumerate(ref_set, start=1)
        if item.route != route.name
    ]
    if wrong:
        raise ReferenceSetError(ref_set.source or ref_set.name, wrong)
    return ref_set


class ControlPlane:
    """Every route's ``RouteControl``: samples in, budgets out; the admin API's operations."""

    def __init__(self, settings: Settings, routes: RoutesConfig, store: Store, metrics: Metrics) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.routes: dict[str, RouteControl] = {}
        # Set when replicas share a Redis store: samples then go to the shared log, and the route's
        # leader (whichever replica holds its lease) steps the controller.
        self.fleet: Shared | None = None
        self.upload_lock = asyncio.Lock()  # uploads run in a worker thread, one at a time (gateway/http/admin.py)
        for route in routes.routes:
            config = controller_config(route) if route.control is not None and route.control.enabled else None
            state = None
            if config is not None:
                saved = store.load(route.name)  # {} when only samples were saved (no controller then)
                # retarget: a target changed in the routes file since the state was saved
                state = retarget(state_from_dict(saved), config) if saved else initial_state(config)
            refs = route_references(route, store.reference_sets(route.name))  # uploads survive restarts
            rc = RouteControl(route, config, state, refs, counts=Counter(store.counts(route.name)))
            self.routes[route.name] = rc
            self._publish(rc)

    def load_stored_references(self, route_name: str, stored: list[tuple[str, str]]) -> None:
        """Replace the route's references with its files' sets plus ``stored`` uploads (another replica's)."""
        rc = self.routes[route_name]
        rc.references = route_references(rc.route, stored)

    # -- the request path and the sampler ------------------------------------

    def controlled(self, route: RouteConfig) -> Controlled | None:
        return self.routes[route.name].controlled()

    def count_live(self, route: str, tokens: int) -> None:
        """Live generated tokens fund evaluation work (``eval_share``)."""
        rc = self.routes[route]
        rc.live_tokens += tokens
        if self.fleet is not None:
            self.fleet.add_tokens(route, "live", tokens)
        self._publish_share(rc)

    def count_eval(self, route: str, source: str, tokens: int) -> None:
        """Tokens spent on evaluation runs (``canary``, ``shadow``), counted against ``eval_share``."""
        rc = self.routes[route]
        rc.eval_tokens[source] += tokens
        if self.fleet is not None:
            self.fleet.add_tokens(route, source, tokens)
        self.metrics.tokens.labels(route, source).inc(tokens)
        self._publish_share(rc)

    def leads(self, route: str) -> bool:
        """Whether this replica schedules the route's canaries: on its own store always, in a fleet
        only while it holds the route's lease."""
        return self.fleet is None or self.fleet.leads(route)

    def observe(self, sample: SampleRecord, *, at_controlled: bool) -> None:
        """Fold one EM sample in: counters always; the controller only for samples at its settings
        (``at_controlled``: the request ran at the controller's budget and strictness, unsteered)."""
        rc = self.routes[sample.route]
        route = rc.route.name
        rc.counts[sample.source] += 1
        self.metrics.em_samples.labels(route, sample.source, "correct" if sample.correct else "incorrect").inc()
        if self.fleet is not None:  # the route's leader steps the controller, in log order
            self.fleet.submit(sample, at_controlled and rc.config is not None)
            return
        if rc.config is None or rc.state is None or not at_controlled:
            self.store.save(route, state_to_dict(rc.state) if rc.state is not None else {}, sample)
            return
        before = rc.state
        rc.state = step(before, Sample(sample.correct, sample.budget, sample.level, sample.source), rc.config)
        self.store.save(route, state_to_dict(rc.state), sample)
        if (rc.state.budget, rc.state.level) != (before.budget, before.level):
            looser = (rc.state.budget, rc.state.level) > (before.budget, before.level)
            self.metrics.adjustments.labels(route, "up" if looser else "down").inc()
        self._publish(rc)

    async def aclose(self) -> None:
        self.store.close()

    # -- the admin side ---------------------------------------------------

    def get(self, route_name: str) -> RouteControl:
        rc = self.routes.get(route_name)
        if rc is None:
            raise NotFound(f"No route named '{route_name}'. Routes: {', '.join(sorted(self.routes))}.", param="route")
        return rc

    def _controlled_route(self, route_name: str) -> tuple[RouteControl, ControllerConfig, ControllerState]:
        rc = self.get(route_name)
        if rc.config is None or rc.state is None:
            raise InvalidRequest(f"Route '{route_name}' has no controller (no enabled `control` block).", param="route")
        return rc, rc.config, rc.state

    def snapshot(self, route_name: str) -> dict[str, Any]:
        rc = self.get(route_name)
        spent = sum(rc.eval_tokens.values())
        out: dict[str, Any] = {
            "route": route_name,
            "references": {"sets": list(rc.references.names()), "items": len(rc.references)},
            "samples": {s: rc.counts.get(s, 0) for s in (GOLD, CANARY, SHADOW)},
            "eval_tokens": {s: rc.eval_tokens.get(s, 0) for s in (CANARY, SHADOW)},
            "eval_share": {
                "limit": self.settings.eval_share,
                "used": spent / rc.live_tokens if rc.live_tokens else 0.0,
                "live_tokens": rc.live_tokens,
                "eval_tokens": spent,
            },
        }
        if self.fleet is not None:
            out["fleet"] = self.fleet.describe(route_name)
        if rc.config is None or rc.state is None:
            out["controller"] = None
            out["budget"] = rc.route.budget
            return out
        state, config = rc.state, rc.config
        hits, n = sum(state.window), len(state.window)
        low, high = wilson(hits, n, 1.96)
        controlled = rc.controlled()
        out["budget"] = state.budget
        out["controller"] = {
            "target": config.target,
            "budget": state.budget,
            "min_budget": config.min_budget,
            "max_budget": config.max_budget,
            "strictness": None
            if controlled is None or controlled.param is None
            else {"param": controlled.param, "value": controlled.value, "level": controlled.level},
            "frozen": state.frozen,
            "adjustments": state.adjustments,
            "window": {"samples": n, "em": hits / n if n else None, "wilson95": [low, high] if n else None},
            "state": state_to_dict(state),
        }
        return out

    async def freeze(self, route_name: str, frozen: bool) -> dict[str, Any]:
        rc, _, _ = self._controlled_route(route_name)
        await self._write(rc, lambda state, config: (replace(state, frozen=frozen), config))
        return self.snapshot(route_name)

    async def set_budget(self, route_name: str, budget: int) -> dict[str, Any]:
        rc, config, _ = self._controlled_route(route_name)
        if not config.min_budget <= budget <= config.max_budget:
            raise InvalidRequest(
                f"budget {budget} is outside the route's bounds [{config.min_budget}, {config.max_budget}].",
                param="budget",
            )
        await self._write(rc, lambda state, config: (override_budget(state, budget, config), config))
        return self.snapshot(route_name)

    async def set_target(self, route_name: str, target: float) -> dict[str, Any]:
        rc, _, _ = self._controlled_route(route_name)
        if not 0.0 < target <= 1.0:
            raise InvalidRequest(f"target {target} must be in (0, 1].", param="target")
        try:
            config = controller_config(rc.route, target)
        except ConfigError as exc:  # the route's other controller settings do not fit this target
            raise InvalidRequest(f"target {target} does not fit the route's controller: {exc}", param="target") from exc
        await self._write(rc, lambda state, _: (retarget(state, config), config))
        return self.snapshot(route_name)

    async def upload(self, route_name: str, name: str, text: str) -> dict[str, Any]:
        """Validate a JSONL reference set as a whole and add it (or replace the set of that name).

        Parsing tens of MB and the store's write (Redis may be slow or down) run in a worker thread."""
        rc = self.get(route_name)

        def parse() -> ReferenceIndex:
            ref_set = check_route(rc.route, parse_reference_lines(name, text, source=f"upload {name!r}"))
            try:
                return rc.references.replace(ref_set)
            except ValueError as exc:
                raise InvalidRequest(str(exc), param="body") from exc

        references = await asyncio.to_thread(parse)
        with unavailable_if_shared(self.fleet):  # durable before it is acknowledged
            await asyncio.to_thread(self.store.save_reference_set, route_name, name, text)
        rc.references = references
        return self.snapshot(route_name)

    async def delete_references(self, route_name: str, name: str) -> dict[str, Any]:
        """Remove the reference set ``name`` (uploaded or from the routes file); durable across restarts."""
        rc = self.get(route_name)
        if name not in set(rc.references.names()):
            raise NotFound(f"Route '{route_name}' has no reference set named '{name}'.", param="name")
        with unavailable_if_shared(self.fleet):
            await asyncio.to_thread(self.store.save_reference_set, route_name, name, DELETED)
        rc.references = rc.references.without(name)
        return self.snapshot(route_name)

    async def _write(self, rc: RouteControl, change: Change) -> None:
        """An operator's change, made durable before it takes effect here (a failed write changes nothing).

        On its own store the replica's state is the truth and the write is immediate. With replicas
        sharing Redis, the change is applied to the state stored *now* (the leader may have folded in
        samples since this replica last refreshed) and written compare-and-set, in a worker thread so
        that a Redis outage does not stall the event loop."""
        assert rc.config is not None and rc.state is not None
        local_state, local_config = rc.state, rc.config
        if self.fleet is None:
            state, config = change(local_state, local_config)
            self.store.save(rc.route.name, state_to_dict(state))
        elif not isinstance(self.store, Versioned):
            raise TypeError(f"a fleet needs a compare-and-set store, not {type(self.store).__name__}")
        else:
            done: list[tuple[ControllerState, ControllerConfig]] = []

            def apply(current: dict[str, Any] | None) -> dict[str, Any]:
                base = state_from_dict(current) if current else local_state
                config = local_config
                if base.target is not None and base.target != config.target:  # set through another replica
                    config = controller_config(rc.route, base.target)
                done[:] = [change(base, config)]  # the last attempt is the one written
                return state_to_dict(done[0][0])

            with unavailable_if_shared(self.fleet):
                await asyncio.to_thread(self.store.update, rc.route.name, apply)
            state, config = done[0]
        rc.state, rc.config = state, config
        self._publish(rc)

    def _publish(self, rc: RouteControl) -> None:
        m, name = self.metrics, rc.route.name
        if rc.state is None or rc.config is None:
            m.budget.labels(name).set(rc.route.budget)
            return
        m.budget.labels(name).set(rc.state.budget)
        m.em_target.labels(name).set(rc.config.target)
        if rc.state.window:
            hits, n = sum(rc.state.window), len(rc.state.window)
            m.em_ratio.labels(name).set(hits / n)
            m.em_lower_bound.labels(name).set(wilson(hits, n, 1.96)[0])

    def _publish_share(self, rc: RouteControl) -> None:
        spent = sum(rc.eval_tokens.values())
        self.metrics.eval_share.labels(rc.route.name).set(spent / rc.live_tokens if rc.live_tokens else 0.0)
