"""The one interface of a generation session, and the one place that picks its kind.

A ``Session`` is one completion's generation as the orchestrator
(``gateway/completions.py``) and the EM sampler see it: a chunk stream, the
request it serves, its stop spec and its net token accounting. Two kinds
satisfy it: ``Generation`` (one sequence, one policy; gateway/stopping/
session.py) and ``EnsembleGeneration`` (a vote over samples; gateway/
stopping/ensemble.py). ``open_session`` is the only place that tells them
apart.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, Protocol

from gateway.engine.client import EngineClient
from gateway.stopping.accounting import Accounting
from gateway.stopping.ensemble import EnsembleGeneration
from gateway.stopping.probes import Probes
from gateway.stopping.session import Generation
from gateway.stopping.spec import ENSEMBLE, RequestContext, StopSpec, resolve_stop_spec


class Session(Protocol):
    ctx: RequestContext
    spec: StopSpec
    accounting: Accounting
    #: The session's own probes (None: it runs none), for the probe latency histogram.
    probes: Probes | None

    @property
    def policy_name(self) -> str:
        """The policy it runs: a registry name, so a bounded metric label."""
        ...

    @property
    def evaluable(self) -> bool:
        """True if the EM sampler may score its answer and rerun it; else only its tokens count as live work."""
        ...

    @property
    def more_buffered(self) -> bool:
        """Taking the next chunk from ``chunks()`` (or its end) won't wait on the engine: the SSE stream
        (``Completion.stream``) sends a burst in one write."""
        ...

    def chunks(self) -> AsyncGenerator[dict[str, Any], None]:
        """The client's chunks, in the endpoint's format; the last carries usage and the extension.

        Validation happened when the session was opened: errors here are the engine's or a policy's.
        """
        ...


def open_session(upstream: EngineClient, ctx: RequestContext, *, vllm: bool) -> Session:
    """The session that serves ``ctx``: an ensemble for policy ``ensemble``, else one generation.

    Checks the request before any I/O: a bad one raises here (a 4xx).
    """
    if resolve_stop_spec(ctx).policy == ENSEMBLE:
        return EnsembleGeneration(upstream, ctx, vllm=vllm)
    return Generation(upstream, ctx, vllm=vllm)
