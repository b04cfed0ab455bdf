"""The ensemble session: samples drawn in waves, voted on, stopped early when the vote is clear.

Each sample is an ordinary ``Generation`` running the plan's inner policy
(itself bounded by the budget). After each wave the pure rule in
``policies/ensemble.py`` says stop or draw more. The client gets the first
sample that holds the majority answer, as one chunk; the extension adds the
votes, and the token accounting sums every sample.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import fields
from typing import Any

from gateway.engine.client import EngineClient
from gateway.errors import InvalidRequest, LimitExceeded
from gateway.evaluation import get_extractor, get_normalizer
from gateway.openai.chunks import choice_text, collect, response_chunk
from gateway.openai.protocol import StopgateOptions
from gateway.stopping.accounting import Accounting
from gateway.stopping.cost import COST_STOP, CostMeter
from gateway.stopping.probes import Probes
from gateway.stopping.session import Generation
from gateway.stopping.spec import ENSEMBLE, RequestContext, StopSpec, max_tokens_for, policy_param, resolve_stop_spec
from policies.base import PolicyError
from policies.ensemble import Verdict, judge, weighted_judge
from policies.registry import ensemble_params


class EnsembleGeneration:
    """A vote over several ``Generation`` samples, answered as one chunk: a ``Session``."""

    #: Its answer is a vote of several runs, not one run at its stop spec: the EM sampler counts its tokens only.
    evaluable = False

    def __init__(self, upstream: EngineClient, ctx: RequestContext, *, vllm: bool = True) -> None:
        self.upstream = upstream
        self.ctx = ctx
        self.vllm = vllm
        self.spec: StopSpec = resolve_stop_spec(ctx)
        try:
            self.plan, self.inner_params = ensemble_params(
                self.spec.params, budget=self.spec.budget, trusted_patterns=ctx.route.trusted_patterns
            )
        except PolicyError as exc:
            raise InvalidRequest(f"Invalid stopping settings: {exc}", param=policy_param(exc)) from exc
        if ctx.request.n != 1:
            raise InvalidRequest("policy 'ensemble' draws its own samples; send n=1.", param="n")
        # Bounded before any I/O: the samples by the gateway's cap, their tokens by the request's cost ceiling.
        limit = ctx.max_ensemble_samples
        if self.plan.max_samples > limit:
            raise LimitExceeded(
                f"max_samples={self.plan.max_samples} exceeds the limit of {limit} samples per request "
                "(max_ensemble_samples).",
                param="stopgate.params.max_samples",
            )
        max_tokens = max_tokens_for(ctx)
        self.cost = CostMeter.for_request(max_tokens, ctx.max_cost_multiple)
        self.cost.require(self.plan.max_samples, max_tokens, param="stopgate.params.max_samples", what="This ensemble")
        self._max_tokens = max_tokens
        self.accounting = Accounting()
        self.policy_name = ENSEMBLE
        self.probes: Probes | None = None  # samples stop by themselves; the ensemble runs no probes of its own
        self.votes: list[str | None] = []
        self._extract = get_extractor(ctx.route.extractor, ctx.route.extractor_pattern)
        self._normalize = get_normalizer(ctx.route.normalizer)
        self._first(0)  # validate the sample request before any I/O

    def _sample_ctx(self, index: int) -> RequestContext:
        req = self.ctx.request
        member = self.plan.member(index)  # a heterogeneous ensemble: this sample's own stopping setting
        options = (
            StopgateOptions(policy=self.plan.inner, params=self.inner_params, budget=self.spec.budget)
            if member is None
            else StopgateOptions(
                policy=member.policy, params=dict(member.params), budget=member.budget or self.spec.budget
            )
        )
        update: dict[str, Any] = {"stream": False, "stopgate": options}
        if "temperature" not in req.model_fields_set:
            update["temperature"] = self.plan.temperature
        sample = req.model_copy(update=update)  # updated fields count as set: they pass through
        return RequestContext(
            self.ctx.endpoint,
            sample,
            self.ctx.route,
            f"{self.ctx.request_id}-s{index}",
            self.ctx.max_n,
            max_cost_multiple=self.ctx.max_cost_multiple,
            cost=self.cost,
        )

    def _first(self, index: int) -> Generation:
        return Generation(self.upstream, self._sample_ctx(index), vllm=self.vllm)

    def _answer(self, body: dict[str, Any]) -> str | None:
        raw = self._extract(choice_text(body))
        return self._normalize(raw) if raw is not None else None

    more_buffered = False  # one chunk, sent when every sample is drawn

    async def chunks(self) -> AsyncGenerator[dict[str, Any], None]:
        samples: list[tuple[Generation, dict[str, Any]]] = []
        wave = self.plan.wave
        verdict = Verdict(False, None, "drawing", wave)
        while not verdict.done:
            if samples and not self.cost.fits(wave * self._max_tokens):
                # Another wave could pass the request's cost ceiling: answer with the votes so far.
                verdict = Verdict(True, verdict.answer, COST_STOP)
                break
            gens = [self._first(len(samples) + i) for i in range(wave)]
            bodies = await asyncio.gather(*(collect(g.chunks(), self.ctx.endpoint) for g in gens))
            for gen, body in zip(gens, bodies, strict=True):
                samples.append((gen, body))
                self.votes.append(self._answer(body))
                _add(self.accounting, gen.accounting)
            verdict = weighted_judge(self.votes, self.plan) if self.plan.members else judge(self.votes, self.plan)
            wave = verdict.next_wave
        chosen = next((b for (_, b), v in zip(samples, self.votes, strict=True) if v == verdict.answer), samples[0][1])
        extension = self._extension(verdict, len(samples))
        yield response_chunk(chosen, self.ctx.endpoint, model=self.ctx.request.model, extension=extension)

    def _extension(self, verdict: Verdict, drawn: int) -> dict[str, Any]:
        acc = self.accounting
        return {
            "route": self.ctx.route.name,
            "request_id": self.ctx.request_id,
            "policy": "ensemble",
            "stop_reason": f"ensemble_{verdict.reason}",
            "budget": self.spec.budget,
            "ensemble": {
                "samples": drawn,
                "votes": self.votes,
                "answer": verdict.answer,
                "inner": self.plan.inner if not self.plan.members else "members",
            },
            "tokens": acc.tokens(),
        }


def _add(total: Accounting, part: Accounting) -> None:
    for f in fields(Accounting):
        value = getattr(part, f.name)
        if isinstance(value, int):
            setattr(total, f.name, getattr(total, f.name) + value)
    if total.first_token_at is None:
        total.first_token_at = part.first_token_at
    total.stop_reason = "ensemble"
