"""The evaluation sampler: where EM samples come from (README "Control", docs/controller.md).

It matches live requests to reference items and scores them (``gold``),
replays reference items in the background (``canary``), reruns a share of
early-stopped live requests at the route's maximum budget (``shadow``), and
keeps that work within each route's evaluation share. It hands every sample
to the control plane (gateway/control/plane.py), which steps the controller.

Evaluation runs go through a ``run`` callable (gateway/stopping/runner.py
builds it where the app is wired), so this module does not import the
generation session, and a live request is read through the ``Live`` protocol.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from gateway.control.controller import Controlled
from gateway.control.plane import CANARY, GOLD, SHADOW, ControlPlane, RouteControl
from gateway.control.store import SampleRecord
from gateway.errors import GatewayError, InvalidRequest
from gateway.evaluation import ReferenceItem, exact_match, get_extractor, get_normalizer
from gateway.evaluation.matching import item_key, request_key, steering_override
from gateway.metrics import Metrics
from gateway.openai.protocol import ChatCompletionRequest, CompletionRequest
from gateway.settings import RouteConfig, Settings

log = logging.getLogger("stopgate.control")

# At shutdown, evaluation runs in flight get this long to finish (and hand in their samples) before they are cancelled.
DRAIN_S = 5.0
# Stop reasons that mean the request did not run its reasoning to the end.
NOT_EARLY = frozenset({"finished"})


class LiveContext(Protocol):
    @property
    def request(self) -> CompletionRequest | ChatCompletionRequest: ...
    @property
    def route(self) -> RouteConfig: ...
    @property
    def controlled(self) -> Controlled | None: ...
    @property
    def request_id(self) -> str: ...


class LiveSpec(Protocol):
    @property
    def budget(self) -> int: ...


class LiveAccounting(Protocol):
    @property
    def net(self) -> int: ...
    @property
    def stop_reason(self) -> str | None: ...


class Live(Protocol):
    """What the sampler reads of a finished generation (gateway/stopping/session.py's ``Generation``)."""

    @property
    def ctx(self) -> LiveContext: ...
    @property
    def spec(self) -> LiveSpec: ...
    @property
    def accounting(self) -> LiveAccounting: ...


# Run ``request`` on ``route`` to its end, as ``run(route, request, request_id, controlled)``: the finished
# generation and choice 0's text (gateway/stopping/runner.py).
Run = Callable[
    [RouteConfig, CompletionRequest | ChatCompletionRequest, str, Controlled | None], Awaitable[tuple[Live, str]]
]


class Sampler:
    """Gold, canary and shadow samples for each route, handed to the control plane."""

    def __init__(
        self,
        settings: Settings,
        plane: ControlPlane,
        metrics: Metrics,
        *,
        run: Run,
        in_flight: Callable[[], int],
        seed: int | None = None,
    ) -> None:
        self.settings, self.plane, self.metrics = settings, plane, metrics
        self.run = run
        self.in_flight = in_flight  # live requests being served: evaluation waits while there are many
        self.rng = random.Random(seed)
        self._tasks: set[asyncio.Task[None]] = set()

    # -- live requests ------------------------------------------------------

    def match(self, route: RouteConfig, request: CompletionRequest | ChatCompletionRequest) -> ReferenceItem | None:
        """The reference item a live request replays, if any.

        An explicit ``reference_id`` must name an item whose prompt is the request's own: an unknown id and
        one that names another prompt get the same 400, so the answer says nothing about which ids exist.
        """
        refs = self.plane.routes[route.name].references
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

    def finished(self, live: Live, item: ReferenceItem | None, text: str) -> None:
        """A live request has ended well: count its tokens, score it, maybe start a shadow rerun."""
        rc = self.plane.routes[live.ctx.route.name]
        self.plane.count_live(rc.route.name, live.accounting.net)
        # Only a request at the route's own settings speaks for them (issue 14: no steering by proxy).
        at_controlled = (
            live.ctx.controlled is not None and steering_override(live.ctx.request, rc.route.default_max_tokens) is None
        )
        if item is not None:
            correct = score(rc.route, text, item.answers)
            self._observe(GOLD, correct, live, at_controlled, tokens=0, reference_id=item.id)
            return
        early = live.accounting.stop_reason is not None and live.accounting.stop_reason not in NOT_EARLY
        share = rc.route.evaluation.shadow_share
        if early and share > 0 and self.rng.random() < share and self._may_evaluate(rc, SHADOW):
            self._spawn(self._shadow(rc, live, text, at_controlled))

    def _observe(
        self,
        source: str,
        correct: bool,
        live: Live,
        at_controlled: bool,
        *,
        tokens: int,
        reference_id: str | None = None,
    ) -> None:
        controlled = live.ctx.controlled
        level = controlled.level if controlled is not None else 0
        record = SampleRecord(
            live.ctx.route.name, source, live.spec.budget, level, correct, tokens, time.time(), reference_id
        )
        self.plane.observe(record, at_controlled=at_controlled)

    # -- evaluation runs ----------------------------------------------------

    def _may_evaluate(self, rc: RouteControl, source: str) -> bool:
        if self.in_flight() >= self.settings.eval_max_in_flight:
            self.metrics.eval_skipped.labels(rc.route.name, source, "busy").inc()
            return False
        if sum(rc.eval_tokens.values()) >= self.settings.eval_share * rc.live_tokens:
            self.metrics.eval_skipped.labels(rc.route.name, source, "share").inc()
            return False
        return True

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

    async def _shadow(self, rc: RouteControl, live: Live, text: str, at_controlled: bool) -> None:
        """Rerun an early-stopped live request at the maximum budget; the sample is EM(early, full)."""
        route = rc.route
        request = self._eval_request(live.ctx.request, policy="none", budget=route.max_budget)
        full, full_text = await self.run(route, request, f"{live.ctx.request_id}-shadow", None)
        self.plane.count_eval(route.name, SHADOW, full.accounting.net)
        # Each rerun stands for 1/shadow_share early stops like it (a Horvitz-Thompson estimate; runs
        # skipped for load or share make it an underestimate).
        saved = full.accounting.net - live.accounting.net
        if saved > 0:
            self.metrics.tokens_saved.labels(route.name).inc(saved / route.evaluation.shadow_share)
        reference = answer(route, full_text)
        if reference is None:
            return  # the full run gave no answer either: nothing to compare against
        correct = score(route, text, (reference,))
        self._observe(SHADOW, correct, live, at_controlled, tokens=full.accounting.net)

    async def canary_once(self, route_name: str) -> bool:
        """Replay one random reference item at the route's settings; False if skipped."""
        rc = self.plane.routes[route_name]
        if not self.plane.leads(route_name):
            return False  # the route's leader schedules the fleet's canaries
        items = rc.references.items()
        if not items or not self._may_evaluate(rc, CANARY):
            return False
        item = self.rng.choice(items)
        request = self._eval_request(canary_request(rc.route, item))
        request_id = f"canary-{item.id}-{self.rng.getrandbits(32):08x}"
        gen, text = await self.run(rc.route, request, request_id, rc.controlled())
        self.plane.count_eval(route_name, CANARY, gen.accounting.net)
        self._observe(CANARY, score(rc.route, text, item.answers), gen, True, tokens=gen.accounting.net)
        return True

    async def run_canaries(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """The background loop: each route replays ``canary_per_minute`` items (Poisson arrivals)."""
        rates = {name: rc.route.evaluation.canary_per_minute for name, rc in self.plane.routes.items()}
        rates = {name: rate for name, rate in rates.items() if rate > 0}
        if not rates:
            return
        total = sum(rates.values())
        names, weights = list(rates), list(rates.values())
        while True:
            await sleep(self.rng.expovariate(total / 60.0))
            name = self.rng.choices(names, weights)[0]
            try:
                await self.canary_once(name)
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


def score(route: RouteConfig, text: str, golds: tuple[str, ...]) -> bool:
    extractor = get_extractor(route.extractor, route.extractor_pattern)
    return bool(exact_match(text, golds, extractor=extractor, normalizer=get_normalizer(route.normalizer)))


def answer(route: RouteConfig, text: str) -> str | None:
    raw = get_extractor(route.extractor, route.extractor_pattern)(text)
    return raw if raw else None


def canary_request(route: RouteConfig, item: ReferenceItem) -> CompletionRequest | ChatCompletionRequest:
    common: dict[str, Any] = {"model": route.name, "temperature": 0.0}
    if item.prompt is not None:
        return CompletionRequest.model_validate({**common, "prompt": item.prompt})
    assert item.messages is not None
    return ChatCompletionRequest.model_validate({**common, "messages": [m.model_dump() for m in item.messages]})
