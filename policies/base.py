"""What a stop policy sees and what it says.

A policy is a small synchronous state machine. The generation session feeds
it ``TokenEvent``s as the engine streams and ``ProbeResult``s as side probes
return; it answers with a frozen ``Decision``: go on, start a probe, or stop
(with a reason). Policies do no I/O and never import ``gateway``, so each is
tested with plain lists of events.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal, Protocol

Phase = Literal["thinking", "answer"]


class Action(Enum):
    CONTINUE = "continue"
    PROBE = "probe"
    STOP = "stop"


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str | None = None


CONTINUE = Decision(Action.CONTINUE)
PROBE = Decision(Action.PROBE)


def stop(reason: str) -> Decision:
    return Decision(Action.STOP, reason)


@dataclass(frozen=True)
class TokenChoice:
    """One generated token, its log probability, and the engine's top alternatives at its position."""

    token: str
    logprob: float
    top: Mapping[str, float]


@dataclass(slots=True)
class TokenEvent:
    """New output from the main stream. Treat it as read-only: one is built per chunk, and a frozen dataclass
    builds four times slower (0.85 vs 0.19 us, a few percent of the gateway's CPU per chunk).

    ``thinking_tokens`` counts the reasoning so far. ``text`` is the recent
    tail (up to a couple of thousand characters) of the current phase: the
    reasoning before the think-close delimiter, or the answer after it.
    Policies that need more history keep it themselves. ``top`` has one
    ``TokenChoice`` per new token when the main stream carries top logprobs
    (a policy with ``engine_logprobs`` asks the engine for them).
    """

    phase: Phase
    new_text: str
    new_tokens: int
    thinking_tokens: int
    text: str
    logprobs: tuple[float, ...] | None = None
    top: tuple[TokenChoice, ...] | None = None


@dataclass(frozen=True)
class ProbeResult:
    """A side generation that asked "what is your answer now?".

    ``answer`` is already extracted and normalised by the route's extractor
    (``None`` if nothing could be extracted); ``text`` is the raw probe
    output, for hesitation checks; ``logprobs`` are its tokens' log
    probabilities when they were requested.
    """

    at_tokens: int
    answer: str | None
    text: str
    logprobs: tuple[float, ...] | None = None


class StopPolicy(Protocol):
    name: str
    #: True if probes must request token logprobs.
    wants_logprobs: bool

    @property
    def engine_params(self) -> Mapping[str, Any]:
        """Fields the policy adds to the main stream's engine request (most policies: none).

        Stop strings (``stop``, ``include_stop_str_in_output``) are an offer the gateway may decline: it hands
        them only to a vLLM engine, and only when the client sent no stop strings of its own.
        """
        ...

    @property
    def engine_logprobs(self) -> int:
        """How many top alternatives per main-stream token the policy reads (0: none).

        The gateway asks the engine for at least that many and cuts each chunk back to what the client asked for.
        """
        ...

    def on_tokens(self, event: TokenEvent) -> Decision: ...

    def on_probe(self, result: ProbeResult) -> Decision: ...


class PolicyError(ValueError):
    """A bad policy name or parameter; the message names it, and ``param`` the parameter if there is one."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
