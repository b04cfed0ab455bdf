"""The control plane: EM samples in, budgets out, per route.

For each route with a ``control`` block it keeps the controller's state, the
route's reference items and the evaluation spend, and it runs the evaluation
work (docs/controller.md):

* ``gold``: a live request that names a reference item (``reference_id``) or
  whose normalised prompt matches one is scored against the item's answers.
  It costs nothing extra.
* ``canary``: a background task replays random reference items through the
  same generation path, at the route's current settings, greedy.
* ``shadow``: a sampled share of early-stopped live requests with no
  reference item is rerun at the route's maximum budget with no early stop;
  the sample is EM(early answer, full answer).

Canary and shadow runs of a route together spend at most ``eval_share`` of
the route's live tokens (generated tokens, both sides; checked before each
run, so the spend overshoots by at most one run), are skipped while ``eval_max_in_flight`` live
requests run, and carry vLLM's ``priority`` when ``eval_priority`` is set.

Only samples taken at the controller's own settings are fed to it: a request
that overrides the policy, its parameters or the budget is scored for the
window and the counts but does not move the budget.

Every state change is saved to the store with the sample that caused it, in
one transaction, so a restart resumes where the route was. When replicas share
a Redis store (``fleet``), samples go to the route's shared log instead, and
whichever replica holds the route's lease steps its controller
(gateway/control/fleet.py).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
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
from gateway.engine.client import EngineClient
from gateway.errors import GatewayError, InvalidRequest, NotFound
from gateway.evaluation import (
    ReferenceItem,
    ReferenceSet,
    ReferenceSetError,
    exact_match,
    get_extractor,
    get_normalizer,
    load_reference_file,
    parse_reference_lines,
)
from gateway.evaluation.matching import ReferenceIndex, item_key, request_key, steering_override
from gateway.metrics import Metrics
from gateway.openai.protocol import ChatCompletionRequest, CompletionRequest, Endpoint
from gateway.settings import ConfigError, RouteConfig, RoutesConfig, Settings
from gateway.stopping.session import Generation
from gateway.stopping.spec import RequestContext

log = logging.getLogger("stopgate.control")

# Sources of EM samples.
GOLD, CANARY, SHADOW = "gold", "canary", "shadow"
# A stored reference set's body that records its deletion (a tombstone: the Store keeps its one write call).
DELETED = ""
# An operator's change: (state, config) -> (state, config).
Change = Callable[[ControllerState, ControllerConfig], tuple[ControllerState, ControllerConfig]]
# At shutdown, evaluation runs in flight get this long to finish (and hand in their samples) before they are cancelled.
DRAIN_S = 5.0
# Stop reasons that mean the request did not run its reasoning to the end.
NOT_EARLY = frozenset({"finished"})


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
    from gateway.evaluation import ReferenceIssue

    wrong = [
        ReferenceIssue(number, "route", f"item {item.id!r} belongs to route {item.route!r}, not {route.name!r}")
        for number, item in enumerate(ref_set, start=1)
        if item.route != route.name
    ]
    if wrong:
        raise ReferenceSetError(ref_set.source or ref_set.name, wrong)
    return ref_set


class ControlPlane:
    def __init__(
        self,
        settings: Settings,
        routes: RoutesConfig,
        store: Store,
        metrics: Metrics,
        *,
        in_flight: Callable[[], int],
        seed: int | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.in_flight = in_flight
        self.rng = random.Random(seed)
        self.routes: dict[str, RouteControl] = {}
        self._tasks: set[asyncio.Task[None]] = set()
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

    # -- the request path -------------------------------------------------

    def controlled(self, route: RouteConfig) -> Controlled | None:
        return self.routes[route.name].controlled()

    def match(self, route: RouteConfig, request: CompletionRequest | ChatCompletionRequest) -> ReferenceItem | None:
        """The reference item a live request replays, if any.

        An explicit ``reference_id`` must name an item whose prompt is the request's own: an unknown id and
        one that names another prompt get the same 400, so the answer says nothing about which ids exist.
        """
        refs = self.routes[route.name].references
        explicit = request.reference
        key = request_key(request) if explicit is not None or len(refs) else None
        if explicit is not None:
            item = refs.by_id(explicit)
            if item is None or key is None or item_key(item) != key:
                raise InvalidRequest(
                    f"reference_id {explicit!r} does not name a reference item of route '{route.name}' whose "
                    "prompt is this request's.",
                    param="reference_id",
                )
            return item
        return refs.by_key(key) if key is not None else None

    def finished(self, gen: Generation, item: ReferenceItem | None, text: str, upstream: EngineClient) -> None:
        """A live request has ended well: count its tokens, score it, maybe start a shadow rerun."""
        rc = self.routes[gen.ctx.route.name]
        self.count_live(rc.route.name, gen.accounting.net)
        # Only a request at the route's own settings speaks for them (issue 14: no steering by proxy).
        at_controlled = (
            gen.ctx.controlled is not None and steering_override(gen.ctx.request, rc.route.default_max_tokens) is None
        )
        if item is not None:
            correct = self._score(rc.route, text, item.answers)
            self.observe(rc, GOLD, correct, gen, at_controlled, tokens=0, reference_id=item.id)
            return
        early = gen.accounting.stop_reason is not None and gen.accounting.stop_reason not in NOT_EARLY
        share = rc.route.evaluation.shadow_share
        if early and share > 0 and self.rng.random() < share and self._may_evaluate(rc, SHADOW):
            self._spawn(self._shadow(rc, gen, text, at_controlled, upstream))

    def count_live(self, route: str, tokens: int) -> None:
        """Live generated tokens fund evaluation work (``eval_share``)."""
        rc = self.routes[route]
        rc.live_tokens += tokens
        if self.fleet is not None:
            self.fleet.add_tokens(route, "live", tokens)
        self._publish_share(rc)

    def observe(
        self,
        rc: RouteControl,
        source: str,
        correct: bool,
        gen: Generation,
        at_controlled: bool,
        *,
        tokens: int,
        reference_id: str | None = None,
    ) -> None:
        """Fold one EM sample in: counters always; the controller only for samples at its settings."""
        route = rc.route.name
        rc.counts[source] += 1
        self.metrics.em_samples.labels(route, source, "correct" if correct else "incorrect").inc()
        controlled = gen.ctx.controlled
        budget = gen.spec.budget
        level = controlled.level if controlled is not None else 0
        record = SampleRecord(route, source, budget, level, correct, tokens, time.time(), reference_id)
        if self.fleet is not None:  # the route's leader steps the controller, in log order
            self.fleet.submit(record, at_controlled and rc.config is not None)
            return
        if rc.config is None or rc.state is None or not at_controlled:
            self.store.save(route, state_to_dict(rc.state) if rc.state is not None else {}, record)
            return
        before = rc.state
        rc.state = step(before, Sample(correct, budget, level, source), rc.config)
        self.store.save(route, state_to_dict(rc.state), record)
        if (rc.state.budget, rc.state.level) != (before.budget, before.level):
            looser = (rc.state.budget, rc.state.level) > (before.budget, before.level)
            self.metrics.adjustments.labels(route, "up" if looser else "down").inc()
        self._publish(rc)

    # -- evaluation work ----------------------------------------------------

    def _may_evaluate(self, rc: RouteControl, source: str) -> bool:
        if self.in_flight() >= self.settings.eval_max_in_flight:
            self.metrics.eval_skipped.labels(rc.route.name, source, "busy").inc()
            return False
        if sum(rc.eval_tokens.values()) >= self.settings.eval_share * rc.live_tokens:
            self.metrics.eval_skipped.labels(rc.route.name, source, "share").inc()
            return False
        return True

    def _spend(self, rc: RouteControl, source: str, tokens: int) -> None:
        rc.eval_tokens[source] += tokens
        if self.fleet is not None:
            self.fleet.add_tokens(rc.route.name, source, tokens)
        self.metrics.tokens.labels(rc.route.name, source).inc(tokens)
        self._publish_share(rc)

    def _eval_request(
        self, request: CompletionRequest | ChatCompletionRequest, **stopgate: Any
    ) -> CompletionRequest | ChatCompletionRequest:
        extra: dict[str, Any] = {"stream": False}
        if self.settings.eval_priority is not None:
            extra["priority"] = self.settings.eval_priority
        fields = {**request.model_dump(exclude_unset=True, exclude={"stopgate", "reference_id"}), **extra}
        if stopgate:
            fields["stopgate"] = stopgate
        return type(request).model_validate(fields)

    async def _run(self, upstream: EngineClient, ctx: RequestContext) -> tuple[Generation, str]:
        gen = Generation(upstream, ctx, vllm=self.settings.upstream_is_vllm)
        pieces: list[str] = []
        async for chunk in gen.chunks():
            pieces.append(choice_text(chunk))
        return gen, "".join(pieces)

    async def _shadow(
        self, rc: RouteControl, live: Generation, text: str, at_controlled: bool, upstream: EngineClient
    ) -> None:
        """Rerun an early-stopped live request at the maximum budget; the sample is EM(early, full)."""
        route = rc.route
        request = self._eval_request(live.ctx.request, policy="none", budget=route.max_budget)
        ctx = RequestContext(live.ctx.endpoint, request, route, f"{live.ctx.request_id}-shadow")
        full, full_text = await self._run(upstream, ctx)
        self._spend(rc, SHADOW, full.accounting.net)
        # Each rerun stands for 1/shadow_share early stops like it (a Horvitz-Thompson estimate; runs
        # skipped for load or share make it an underestimate).
        saved = full.accounting.net - live.accounting.net
        if saved > 0:
            self.metrics.tokens_saved.labels(route.name).inc(saved / route.evaluation.shadow_share)
        reference = self._answer(route, full_text)
        if reference is None:
            return  # the full run gave no answer either: nothing to compare against
        correct = self._score(route, text, (reference,))
        self.observe(rc, SHADOW, correct, live, at_controlled, tokens=full.accounting.net)

    async def canary_once(self, route_name: str, upstream: EngineClient) -> bool:
        """Replay one random reference item at the route's settings; False if skipped."""
        rc = self.routes[route_name]
        if self.fleet is not None and not self.fleet.leads(route_name):
            return False  # the route's leader schedules the fleet's canaries
        items = rc.references.items()
        if not items or not self._may_evaluate(rc, CANARY):
            return False
        item = self.rng.choice(items)
        request = canary_request(rc.route, item)
        request = self._eval_request(request)
        endpoint: Endpoint = "completions" if isinstance(request, CompletionRequest) else "chat"
        ctx = RequestContext(endpoint, request, rc.route, f"canary-{item.id}-{self.rng.getrandbits(32):08x}")
        ctx = replace(ctx, controlled=rc.controlled())
        gen, text = await self._run(upstream, ctx)
        self._spend(rc, CANARY, gen.accounting.net)
        self.observe(rc, CANARY, self._score(rc.route, text, item.answers), gen, True, tokens=gen.accounting.net)
        return True

    async def run_canaries(
        self, upstream: EngineClient, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    ) -> None:
        """The background loop: each route replays ``canary_per_minute`` items (Poisson arrivals)."""
        rates = {name: rc.route.evaluation.canary_per_minute for name, rc in self.routes.items()}
        rates = {name: rate for name, rate in rates.items() if rate > 0}
        if not rates:
            return
        total = sum(rates.values())
        names, weights = list(rates), list(rates.values())
        while True:
            await sleep(self.rng.expovariate(total / 60.0))
            name = self.rng.choices(names, weights)[0]
            try:
                await self.canary_once(name, upstream)
            except GatewayError as exc:
                log.warning("canary on route %s failed: %s", name, exc.message)
            except Exception:  # a bug or bad data must not end the loop for good (issue 14)
                self.metrics.background_errors.labels("canary").inc()
                log.exception("canary on route %s failed", name)

    def _spawn(self, work: Awaitable[None]) -> None:
        async def guarded() -> None:
            try:
                await work
            except GatewayError as exc:
                log.warning("evaluation run failed: %s", exc.message)
            except Exception:
                self.metrics.background_errors.labels("evaluation").inc()
                log.exception("evaluation run failed")

        task = asyncio.ensure_future(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout_s: float = DRAIN_S) -> None:
        """Let the evaluation runs in flight finish, for up to ``timeout_s``; cancel the rest. Call it
        before the fleet's last flush, so the samples they hand in are appended, not lost."""
        tasks = list(self._tasks)
        if tasks and timeout_s > 0:
            await asyncio.wait(tasks, timeout=timeout_s)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def aclose(self) -> None:
        await self.drain(0)
        self.store.close()

    # -- scoring ----------------------------------------------------------

    def _score(self, route: RouteConfig, text: str, golds: tuple[str, ...]) -> bool:
        extractor = get_extractor(route.extractor, route.extractor_pattern)
        return bool(exact_match(text, golds, extractor=extractor, normalizer=get_normalizer(route.normalizer)))

    def _answer(self, route: RouteConfig, text: str) -> str | None:
        raw = get_extractor(route.extractor, route.extractor_pattern)(text)
        return raw if raw else None

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


def canary_request(route: RouteConfig, item: ReferenceItem) -> CompletionRequest | ChatCompletionRequest:
    common: dict[str, Any] = {"model": route.name, "temperature": 0.0}
    if item.prompt is not None:
        return CompletionRequest.model_validate({**common, "prompt": item.prompt})
    assert item.messages is not None
    return ChatCompletionRequest.model_validate({**common, "messages": [m.model_dump() for m in item.messages]})


def choice_text(chunk: dict[str, Any]) -> str:
    """The text of choice 0 in a completion or chat chunk."""
    for choice in chunk.get("choices") or []:
        if choice.get("index", 0) == 0:
            if "text" in choice:
                return str(choice.get("text") or "")
            delta = choice.get("delta") or choice.get("message") or {}
            return str(delta.get("content") or "")
    return ""
