"""One request's generation: the upstream stream, the policy, the probes, the stop, the forced answer.

``Generation.chunks()`` serves streaming and non-streaming clients alike. A
stop leaves the upstream ``async with`` block, which closes the connection so
the engine aborts; a stop during the reasoning is followed by the route's
``answer_suffix`` and the model's short forced answer. The last chunk always
carries ``finish_reason``, ``usage`` and the ``stopgate`` extension.

With a reasoning parser (vLLM's ``--reasoning-parser``) the thinking arrives
in ``delta.reasoning`` / ``delta.reasoning_content`` and the first non-empty
``content`` ends it; side generations continue ``think_open`` plus that
reasoning, and the forced answer's delimiter is never shown to the client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from gateway.engine.client import EngineClient
from gateway.errors import GatewayError
from gateway.evaluation import get_extractor, get_normalizer
from gateway.openai.chunks import ChoiceDelta, ChunkParser, text_chunk
from gateway.openai.logprobs import merged_request, token_choices, trim
from gateway.openai.protocol import PATHS
from gateway.stopping.accounting import Accounting
from gateway.stopping.continuation import as_answer, split_suffix, token_logprobs
from gateway.stopping.cost import COST_STOP, CostMeter, sequences
from gateway.stopping.probes import Probes, UntilStopped
from gateway.stopping.rendered import Continuer
from gateway.stopping.spec import PASSTHROUGH, RequestContext, build_request_policy, resolve_stop_spec, upstream_body
from policies.base import Action, Decision, ProbeResult, StopPolicy, TokenEvent

# Policies see the recent tail of the current phase, not all of it: the cost
# per token stays constant however long the reasoning runs.
TAIL_CHARS = 2048


def _finish_in(choices: list[dict[str, Any]]) -> bool:
    """Some choice of the chunk carries a ``finish_reason`` (a loop: this runs for every chunk)."""
    for choice in choices:
        if choice.get("finish_reason"):
            return True
    return False


class PolicyFailed(GatewayError):
    """A policy raised at run time: the request ends with this error, the gateway goes on."""

    error_type = "policy_error"
    code = "policy_error"


class Generation:
    """One sequence stopped by one policy (or passed through): a ``Session``."""

    #: The EM sampler may score its answer and rerun it (gold, shadow).
    evaluable = True

    def __init__(self, upstream: EngineClient, ctx: RequestContext, *, vllm: bool = True) -> None:
        self.upstream = upstream
        self.ctx = ctx
        self.vllm = vllm
        self.spec = resolve_stop_spec(ctx)
        self.policy = build_request_policy(ctx, self.spec)
        self.accounting = Accounting()
        self._body = upstream_body(ctx, vllm=vllm)  # validates before any I/O
        self._top = False  # the policy reads the main stream's top logprobs
        self._client_top: int | None = None  # how many top alternatives the client itself asked for (None: none)
        self._max_tokens = int(self._body["max_tokens"])
        # Generated tokens of the main stream, all choices, at which the gateway ends it itself.
        self._length_limit = self._max_tokens * sequences(ctx.request)
        if ctx.cost is None:
            self.cost = CostMeter.for_request(self._max_tokens, ctx.max_cost_multiple)
            self.cost.require(sequences(ctx.request), self._max_tokens, param="n", what="This request")
        else:
            self.cost = ctx.cost
        self._engine_stops: frozenset[str] = frozenset()  # the stop strings the gateway (not the client) added
        if self.policy is not None:
            self._ask_engine(self.policy)
        self._parser = ChunkParser(ctx.endpoint)
        self._meta: dict[str, Any] = {}
        self._phase = "thinking"
        self._thinking_text = ""
        self._answer_text = ""
        self._generated: list[str] = []
        self._reasoning: list[str] = []  # the thinking a reasoning parser split off, in order
        self._stop_event = asyncio.Event()
        self._probe_stopped = False  # the stop came from a probe's result (not from the stream itself)
        self._policy_error: PolicyFailed | None = None
        self._finished = False  # the engine ended the stream itself
        self._in_hand = 0  # chunks of the engine's last burst not yet taken from chunks()
        self.probes: Probes | None = None
        self.continuer = Continuer(
            upstream, endpoint=ctx.endpoint, request=ctx.request, route=ctx.route, request_id=ctx.request_id
        )
        if self.policy is not None:
            route = ctx.route
            self.probes = Probes(
                self.continuer,
                extractor=get_extractor(route.extractor, route.extractor_pattern),
                normalizer=get_normalizer(route.normalizer),
                logprobs=self.policy.wants_logprobs,
                on_result=self._on_probe,
            )

    def _ask_engine(self, policy: StopPolicy) -> None:
        """Add what the policy asks of the engine to the engine request, as far as the client leaves room."""
        params = policy.engine_params
        if "stop" not in params:
            self._body.update(params)
        # The engine may stop at a plain-string marker or cue itself, unless the client set stop strings.
        elif self.vllm and not {"stop", "include_stop_str_in_output"} & set(self._body):
            self._body.update(params)
            self._engine_stops = frozenset(params["stop"])
        if policy.engine_logprobs:
            # Whatever the client sent (logprobs false, fewer top entries), the engine returns what the policy reads.
            self._client_top = merged_request(self.ctx.endpoint, self._body, policy.engine_logprobs)
            self._top = True

    # -- the policy side --------------------------------------------------

    def _decide(self, decision: Decision) -> None:
        if decision.action is Action.STOP and self.accounting.stop_reason is None:
            self.accounting.stop_reason = decision.reason or "policy"
            self._stop_event.set()
        elif decision.action is Action.PROBE and self.probes is not None and self.accounting.stop_reason is None:
            # A probe spends only the slack: what the main stream and the forced answer may still need stays free.
            route = self.ctx.route
            need = route.probe_max_tokens + max(0, self._max_tokens - self.accounting.main) + route.forced_max_tokens
            if self.cost.fits(need) and self.probes.launch(self.accounting.thinking, self._continued_text()):
                self.cost.charge(route.probe_max_tokens)

    def _charge(self, tokens: int) -> None:
        if not self.cost.charge(tokens) and self.accounting.stop_reason is None:
            self.accounting.stop_reason = COST_STOP
            self._stop_event.set()

    def _fail(self, exc: Exception) -> None:
        name = self.policy.name if self.policy else "?"
        self._policy_error = PolicyFailed(f"The stop policy '{name}' failed: {type(exc).__name__}: {exc}")
        self._stop_event.set()

    def _on_probe(self, result: ProbeResult) -> None:
        # A probe that returns after the reasoning ended has nothing left to cut.
        if self.policy is None or self._phase != "thinking" or self._finished:
            return
        try:
            decision = self.policy.on_probe(result)
        except Exception as exc:  # a policy bug ends this request only
            self._fail(exc)
            return
        if decision.action is Action.STOP and self.accounting.stop_reason is None:
            self._probe_stopped = True
        self._decide(decision)

    def _observe(self, delta: ChoiceDelta) -> None:
        acc = self.accounting
        text = delta.text
        new_text = text
        self._generated.append(text)
        if self._phase == "thinking" and self._parser_shape:
            # A reasoning parser's shape: reasoning deltas are the thinking, content starts the answer.
            # A chunk carrying both counts as thinking, as the bare chunk holding think_close does.
            reasoning = delta.reasoning
            self._reasoning.append(reasoning)
            self._thinking_text = (self._thinking_text + reasoning)[-TAIL_CHARS:]
            if reasoning:
                acc.thinking += delta.tokens
            else:
                acc.answer += delta.tokens
            if text:
                self._phase = "answer"
                self._answer_text = text[-TAIL_CHARS:]
            else:
                new_text = reasoning
        elif self._phase == "thinking":
            close = self.ctx.route.think_close
            combined = self._thinking_text + text
            at = combined.find(close, max(0, len(self._thinking_text) - len(close) + 1)) if close else -1
            acc.thinking += delta.tokens
            if at >= 0:
                self._phase = "answer"
                self._thinking_text = combined[:at][-TAIL_CHARS:]
                self._answer_text = combined[at + len(close) :]
            else:
                self._thinking_text = combined[-TAIL_CHARS:]
        else:
            acc.answer += delta.tokens
            self._answer_text = (self._answer_text + text)[-TAIL_CHARS:]
        if self.policy is None:
            return
        phase_text = self._thinking_text if self._phase == "thinking" else self._answer_text
        lps = token_logprobs(delta.logprobs) if delta.logprobs is not None else None
        event = TokenEvent(
            self._phase,  # type: ignore[arg-type]
            new_text,
            delta.tokens,
            acc.thinking,
            phase_text,
            tuple(lps) if lps else None,
            token_choices(delta.logprobs) if self._top else None,
        )
        try:
            decision = self.policy.on_tokens(event)
        except Exception as exc:
            self._fail(exc)
            return
        if decision.action is not Action.CONTINUE:
            self._decide(decision)

    @property
    def _parser_shape(self) -> bool:
        """The engine splits the thinking off (seen in the stream, or declared by the route)."""
        return self._parser.reasoning_field is not None or (
            self.ctx.route.reasoning_parser and self.ctx.endpoint == "chat"
        )

    def _continued_text(self) -> str:
        """What the model has written so far, as a continuation must repeat it.

        With a reasoning parser the engine swallowed ``think_open``; the continuation puts it back. (vLLM 0.32's
        streaming parser leaves it in when it shares the first delta with more text: then it is not doubled.)
        """
        if self._parser_shape:
            reasoning, think_open = "".join(self._reasoning), self.ctx.route.think_open
            return reasoning if reasoning.startswith(think_open) else think_open + reasoning
        return "".join(self._generated)

    # -- the stream side --------------------------------------------------

    @property
    def more_buffered(self) -> bool:
        """Chunks of the engine's last burst (or the final chunk) are left: the next won't wait on the engine."""
        return self._in_hand > 0

    async def chunks(self) -> AsyncGenerator[dict[str, Any], None]:
        acc = self.accounting
        usage: dict[str, Any] | None = None
        held: dict[str, Any] | None = None
        async with self.upstream.stream(PATHS[self.ctx.endpoint], self._body, request_id=self.ctx.request_id) as stream:
            reader = UntilStopped(stream, self._stop_event, self.probes)
            observe = self.ctx.request.n == 1 or self.policy is not None
            leave = False  # leaving the block closes the upstream stream: the engine aborts
            try:
                while not leave and (batch := await reader.next()):
                    self._in_hand = len(batch)
                    for chunk in batch:
                        if self._in_hand < len(batch) and self.probes is not None and self.probes.inflight:
                            # Probes run between the chunks of a burst, as between reads (else a backlog
                            # launches and replaces probes that never ran: tests/test_stop_races.py).
                            await asyncio.sleep(0)
                            if self._stop_event.is_set():
                                leave = True
                                break
                        self._in_hand -= 1
                        if not self._meta:
                            self._remember_meta(chunk)
                        chunk_usage = chunk.get("usage")
                        if isinstance(chunk_usage, dict):
                            usage = chunk_usage
                            acc.prompt = int(usage.get("prompt_tokens") or acc.prompt)
                        if not chunk.get("choices"):
                            continue  # the usage-only chunk; usage rides on our final chunk
                        for delta in self._parser.parse(chunk):
                            if acc.first_token_at is None and (delta.text or delta.reasoning):
                                acc.first_token_at = time.monotonic()
                            self._charge(delta.tokens)
                            if observe:
                                self._observe(delta)
                            else:
                                acc.thinking += delta.tokens
                        out = self._client_chunk(chunk)
                        at_limit = acc.main >= self._length_limit
                        finished = _finish_in(out["choices"])
                        imposed = at_limit and not finished
                        if imposed:
                            # The engine ignored max_tokens: the gateway ends the sequence itself, as it should.
                            for choice in out["choices"]:
                                choice["finish_reason"] = "length"
                            finished = True
                        self._finished = self._finished or finished
                        if held is not None:
                            yield held
                            held = None
                        if self._stop_event.is_set():
                            if self._probe_stopped and self._phase == "answer":
                                # The probe's stop landed with the chunk in which the model closed its reasoning
                                # itself: nothing is left to cut, and stopping now would lose the answer.
                                acc.stop_reason, self._probe_stopped = None, False
                                self._stop_event.clear()
                            else:
                                held, leave = out, True
                                break
                        if finished:
                            held = out
                            if imposed or (at_limit and self._length_limit > self._max_tokens):
                                # Close the stream of an engine that would go on. One sequence that the engine
                                # ended itself is read on to [DONE]: its usage chunk comes, and the connection
                                # is kept for the next request instead of reconnecting.
                                leave = True
                                break
                        else:
                            yield out
            finally:
                self._in_hand = 0
                await reader.aclose()
                if self.probes is not None:
                    await self.probes.aclose()
        if self._policy_error is not None:
            raise self._policy_error
        if acc.stop_reason is not None:
            if held is not None:
                for choice in held["choices"]:
                    choice["finish_reason"] = None
                    choice.pop("stop_reason", None)  # the engine's, if it stopped at a marker itself
                yield held
            held = None
            if self._phase == "thinking" and self.policy is not None and self.cost.remaining > 0:
                async for out in self._forced_answer():
                    if any(c.get("finish_reason") for c in out["choices"]):
                        held = out
                    else:
                        yield out
        elif held is not None and self._cut_by_our_stop_string(held) and self.cost.remaining > 0:
            # vLLM applies stop strings to the whole output: a cue in the answer ended it. Resume it once, without.
            for choice in held["choices"]:
                choice["finish_reason"] = None
                choice.pop("stop_reason", None)
            yield held
            held = None
            async for out in self._continuation(
                "", self._resume_text(), max_tokens=self._resume_budget(), kind="resumed"
            ):
                if any(c.get("finish_reason") for c in out["choices"]):
                    held = out
                else:
                    yield out
        finish = "length" if acc.stop_reason == COST_STOP else "stop"
        final = held if held is not None else self._text_chunk("", finish_reason=finish)
        final["usage"] = self._final_usage(usage)
        final["stopgate"] = self.extension()
        self._in_hand = 1  # nothing after the final chunk waits on the engine: it goes out with the stream's end
        yield final
        req = self.ctx.request
        if req.stream_options is not None and req.stream_options.include_usage:
            usage_chunk = self._text_chunk("")
            usage_chunk["choices"] = []
            usage_chunk["usage"] = final["usage"]
            yield usage_chunk

    async def _forced_answer(self) -> AsyncIterator[dict[str, Any]]:
        """Close the reasoning and let the model write its answer (a short continuation)."""
        route = self.ctx.route
        suffix = route.answer_suffix
        field = self._parser.reasoning_field or ("reasoning" if self._parser_shape else None)
        if field is None:
            yield self._text_chunk(suffix)
        else:
            before, after = split_suffix(suffix, route.think_close)
            if before:
                yield self._text_chunk(before, field=field)
            if after:
                yield self._text_chunk(after)
        async for out in self._continuation(
            suffix, self._continued_text(), max_tokens=min(route.forced_max_tokens, self.cost.remaining)
        ):
            yield out

    async def _continuation(
        self, suffix: str, text: str, *, max_tokens: int, kind: str = "forced"
    ) -> AsyncIterator[dict[str, Any]]:
        """Continue ``text`` + ``suffix`` (no stop strings); its tokens count as forced, its text as the answer."""
        field = self._parser.reasoning_field or ("reasoning" if self._parser_shape else None)
        acc = self.accounting
        async with self.continuer.stream(
            text,
            suffix,
            max_tokens=max_tokens,
            greedy=False,
            logprobs=False,
            request_id=f"{self.ctx.request_id}-{kind}",
        ) as stream:
            shape = self.continuer.shape
            parser = ChunkParser(shape)
            async for chunk in stream:
                usage = chunk.get("usage")
                if isinstance(usage, dict) and usage.get("prompt_tokens"):
                    acc.forced_prompt = int(usage["prompt_tokens"])
                if not chunk.get("choices"):
                    continue
                for delta in parser.parse(chunk):
                    acc.forced += delta.tokens
                    self.cost.charge(delta.tokens)
                if shape != self.ctx.endpoint:  # completions text continuing a chat (continuation: rendered)
                    for choice in chunk["choices"]:
                        yield self._text_chunk(str(choice.get("text") or ""), finish_reason=choice.get("finish_reason"))
                    continue
                out = self._client_chunk(chunk)
                out["id"] = self._meta.get("id", out.get("id"))
                out.pop("usage", None)
                if field is not None:
                    as_answer(out)
                yield out

    def _cut_by_our_stop_string(self, held: dict[str, Any]) -> bool:
        """The engine ended the answer at a stop string the gateway added (a cue), not at the model's end."""
        if self.accounting.stop_reason is not None or self._phase != "answer" or not self._engine_stops:
            return False
        return any(c.get("stop_reason") in self._engine_stops for c in held["choices"])

    def _resume_text(self) -> str:
        """Everything the model wrote, delimiters included, for a continuation that picks up the answer."""
        if self._parser_shape:
            return self._continued_text() + self.ctx.route.think_close + "".join(self._generated)
        return "".join(self._generated)

    def _resume_budget(self) -> int:
        """The client's max_tokens less what the main stream generated (at least one token)."""
        return max(1, min(self._max_tokens - self.accounting.main, self.cost.remaining))

    # -- what the client sees -------------------------------------------

    @property
    def policy_name(self) -> str:
        """The policy this request runs (a registry name, so a bounded metric label)."""
        return self.spec.policy if self.policy is not None else PASSTHROUGH

    def extension(self) -> dict[str, Any]:
        acc = self.accounting
        ext: dict[str, Any] = {
            "route": self.ctx.route.name,
            "request_id": self.ctx.request_id,
            "policy": self.policy_name,
            "stop_reason": acc.stop_reason or "finished",
            "budget": self.spec.budget if self.policy is not None else None,
            "tokens": acc.tokens(),
        }
        if self.probes is not None:
            s = self.probes.stats
            ext["probes"] = {
                "launched": s.launched,
                "completed": s.completed,
                "cancelled": s.cancelled,
                "skipped": s.skipped,
            }
        return ext

    def _final_usage(self, upstream_usage: dict[str, Any] | None) -> dict[str, Any]:
        acc = self.accounting
        if self.probes is not None:
            acc.probe_prompt = self.probes.stats.prompt_tokens
            acc.probe = self.probes.stats.completion_tokens
        if upstream_usage is not None and acc.stop_reason is None:
            # The engine's own count is authoritative when the stream ran to its end.
            reported = int(upstream_usage.get("completion_tokens") or acc.main)
            acc.answer += reported - acc.main
        usage = dict(upstream_usage or {})
        usage["prompt_tokens"] = acc.prompt
        usage["completion_tokens"] = acc.completion
        usage["total_tokens"] = acc.prompt + acc.completion
        return usage

    def _remember_meta(self, chunk: dict[str, Any]) -> None:
        if not self._meta:
            self._meta = {k: chunk[k] for k in ("id", "object", "created") if k in chunk}

    def _client_chunk(self, chunk: dict[str, Any]) -> dict[str, Any]:
        """The chunk as the client sees it: its own model name; per-chunk usage only if it asked.

        Edits the chunk in place: it is freshly parsed from the engine's stream and
        nothing else holds it (the usage dict it carried is kept by reference).
        """
        chunk["model"] = self.ctx.request.model
        if "usage" in chunk:
            opts = self.ctx.request.stream_options
            if not (opts is not None and opts.continuous_usage_stats):
                del chunk["usage"]
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            chunk["choices"] = choices = []
        if self._top:
            asked = self._client_top
            for choice in choices:
                choice["logprobs"] = None if asked is None else trim(choice.get("logprobs"), asked)
        return chunk

    def _text_chunk(self, text: str, *, finish_reason: str | None = None, field: str = "content") -> dict[str, Any]:
        """A chunk the gateway writes itself, joined to the upstream stream (chat: in ``field`` of the delta)."""
        return text_chunk(
            self.ctx.endpoint,
            text,
            model=self.ctx.request.model,
            meta=self._meta,
            default_id=f"cmpl-{self.ctx.request_id}",
            finish_reason=finish_reason,
            field=field,
        )
