"""One completion through the gateway, from its credentials to its last chunk: no HTTP here.

The HTTP handler (gateway/http/endpoints.py) reads and parses the body and picks
JSON or SSE; this module does everything between. A ``Completion`` is
admitted (authentication and an admission ticket, before the body is read:
a refused caller costs no upload), opened (the route, its checks, the
reference item, the request context, the session), then run to a response
body (``collect``) or as an event stream (``first``, then ``stream``). When
it ends it is observed (metrics) and finished (the control plane gets live
tokens, a gold sample, maybe a shadow rerun). Neither step ever fails the
request it counts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

import anyio

from gateway.errors import GatewayError, LimitExceeded, UpstreamError, internal_error
from gateway.evaluation import ReferenceItem
from gateway.http.admission import Ticket
from gateway.http.auth import Principal
from gateway.http.services import Services
from gateway.metrics import UNKNOWN_POLICY, UNKNOWN_ROUTE
from gateway.openai import sse
from gateway.openai.chunks import choice_text, collect
from gateway.openai.fields import check_client_fields
from gateway.openai.protocol import ChatCompletionRequest, CompletionRequest, Endpoint, validate_request
from gateway.stopping.base import Session, open_session
from gateway.stopping.spec import RequestContext

log = logging.getLogger("stopgate")

MAX_BURST = 32  # SSE events per write at most, so a long backlog still streams


class Completion:
    """One completion request: ``admit``, ``open``, then ``collect`` or ``first`` and ``stream``.

    ``failed`` counts an error the caller renders; ``close`` releases the admission ticket unless the
    event stream took it over (it releases it when it ends).
    """

    def __init__(self, services: Services, endpoint: Endpoint, request_id: str) -> None:
        self.services = services
        self.endpoint = endpoint
        self.request_id = request_id
        self.started = time.monotonic()
        self.route_name = UNKNOWN_ROUTE  # metric labels for an error before the route or the policy is known
        self.policy_name = UNKNOWN_POLICY
        self._principal: Principal | None = None
        self._ticket: Ticket | None = None
        self._session: Session | None = None
        self._item: ReferenceItem | None = None
        self._chunks: AsyncGenerator[dict[str, Any], None] | None = None

    def admit(self, authorization: str | None) -> None:
        """Authenticate the caller and take an admission ticket (401, 403 or 429 if refused)."""
        self._principal = self.services.auth.authenticate(authorization)
        self._ticket = self.services.admission.admit(self._principal)

    def open(self, body: Any) -> Session:
        """Validate the parsed body against its route and open its session; every refusal is a 4xx."""
        assert self._principal is not None and self._ticket is not None, "admit() first"
        services, settings = self.services, self.services.settings
        req = validate_request(self.endpoint, body)
        route = services.route_for(req.model)
        self.route_name = route.name
        services.auth.authorize(self._principal, route.name, reference_id=req.reference is not None)
        check_prompt_size(req, settings.max_prompt_chars)
        check_client_fields(
            req,
            req.passthrough(),
            allowed=route.client_fields,
            max_n=settings.max_n,
            max_batch_prompts=settings.max_batch_prompts,
        )
        self._ticket.enter_route(route)
        self._item = services.sampler.match(route, req)
        ctx = RequestContext(
            self.endpoint,
            req,
            route,
            self.request_id,
            max_n=settings.max_n,
            max_cost_multiple=settings.max_cost_multiple,
            max_ensemble_samples=settings.max_ensemble_samples,
            controlled=services.control.controlled(route),
        )
        self._session = open_session(services.upstream, ctx, vllm=settings.upstream_is_vllm)
        self.policy_name = self._session.policy_name
        return self._session

    @property
    def session(self) -> Session:
        assert self._session is not None, "open() first"
        return self._session

    async def collect(self) -> dict[str, Any]:
        """Run the session to its end: the non-streaming response body, observed and finished."""
        session = self.session
        result = await collect(session.chunks(), self.endpoint)
        _record(self.services, session, 200, self.started)
        _finished(self.services, session, self._item, choice_text(result))
        return result

    async def first(self) -> dict[str, Any]:
        """The stream's first chunk, awaited before the response starts so an engine refusal keeps its status.

        (An ensemble's first chunk comes after its votes: the caller races it against the client leaving.)
        """
        self._chunks = chunks = self.session.chunks()
        try:
            return await chunks.__anext__()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await chunks.aclose()
            raise

    def stream(self, first: dict[str, Any]) -> AsyncGenerator[tuple[bytes, bool], None]:
        """The SSE body from ``first`` on, a write at a time: ``(body, more)``, the last with ``more`` False.

        The chunks of one engine burst (``Session.more_buffered``) go out in one
        write, at most ``MAX_BURST`` of them: a chunk is never held back waiting
        for the engine, and a backlog costs one write, not one per chunk. The
        last write carries the final chunk and ``[DONE]``. The stream owns the
        admission ticket from now on and releases it when it ends.
        """
        assert self._chunks is not None and self._ticket is not None, "first() first"
        ticket, self._ticket = self._ticket, None
        return self._events(first, self._chunks, ticket)

    async def _events(
        self, first: dict[str, Any], chunks: AsyncGenerator[dict[str, Any], None], ticket: Ticket
    ) -> AsyncGenerator[tuple[bytes, bool], None]:
        services, session = self.services, self.session
        code, ended = 200, False
        texts = [choice_text(first)]
        burst = [sse.encode(first)]
        try:
            if not session.more_buffered:
                yield burst.pop(), True
            async for chunk in chunks:
                texts.append(choice_text(chunk))
                burst.append(sse.encode(chunk))
                if not session.more_buffered or len(burst) >= MAX_BURST:
                    body = b"".join(burst)
                    burst.clear()
                    yield body, True
            ended = True
        except GatewayError as exc:
            code = exc.status_code
            if isinstance(exc, UpstreamError):
                services.metrics.upstream_errors.labels(exc.kind).inc()
            burst.append(sse.encode(exc.to_dict()))
        except Exception:
            code = 500
            log.exception("error while streaming request %s", session.ctx.request_id)
            burst.append(sse.encode(internal_error().to_dict()))
        finally:
            # A client that leaves cancels us here: close the upstream (the engine
            # aborts) even though the surrounding scope is cancelled.
            with anyio.CancelScope(shield=True):
                await chunks.aclose()
                _record(services, session, code, self.started)
                ticket.release()
                if code == 200 and ended:
                    _finished(services, session, self._item, "".join(texts))
                elif code == 200:  # the client left: its tokens count as live work, its partial text is no sample
                    _count_live(services, session)
        burst.append(sse.DONE_EVENT)
        yield b"".join(burst), False

    def failed(self, exc: GatewayError) -> None:
        """Count an error the caller renders (the route and policy labels as far as they are known)."""
        metrics = self.services.metrics
        if isinstance(exc, UpstreamError):
            metrics.upstream_errors.labels(exc.kind).inc()
        metrics.requests.labels(self.route_name, self.policy_name, "error", str(exc.status_code)).inc()

    def close(self) -> None:
        """Release the admission ticket, unless the event stream owns it."""
        if self._ticket is not None:
            self._ticket.release()
            self._ticket = None


def check_prompt_size(req: CompletionRequest | ChatCompletionRequest, limit: int) -> None:
    """The prompt (or the messages' text) in characters, against ``max_prompt_chars``."""
    if isinstance(req, CompletionRequest):
        prompt = req.prompt
        if isinstance(prompt, str):
            size = len(prompt)
        else:  # several prompts, or token ids (one each)
            size = sum(len(p) if isinstance(p, str | list) else 1 for p in prompt)
        param = "prompt"
    else:
        size = sum(len(m.content) if isinstance(m.content, str) else len(str(m.content or "")) for m in req.messages)
        param = "messages"
    if size > limit:
        raise LimitExceeded(f"The prompt has {size} characters; the limit is {limit} (max_prompt_chars).", param=param)


def _count_live(services: Services, session: Session) -> None:
    try:
        services.control.count_live(session.ctx.route.name, session.accounting.net)
    except Exception:
        log.exception("evaluation bookkeeping failed for request %s", session.ctx.request_id)


def _finished(services: Services, session: Session, item: ReferenceItem | None, text: str) -> None:
    """Hand a successful request to the control plane: live tokens, a gold sample, maybe a shadow rerun.

    Bookkeeping never fails the request it counts: an error here is logged.
    """
    try:
        if session.evaluable:
            services.sampler.finished(session, item, text)
        else:
            services.control.count_live(session.ctx.route.name, session.accounting.net)
    except Exception:
        log.exception("evaluation bookkeeping failed for request %s", session.ctx.request_id)


def _record(services: Services, session: Session, code: int, started: float) -> None:
    """Count the request in the metrics; a metric update never fails the request it counts."""
    acc = session.accounting
    try:
        services.metrics.request_done(
            session.ctx.route.name,
            session.policy_name,
            "error" if code >= 400 else acc.stop_reason or "finished",
            code,
            prompt=acc.prompt,
            completion=acc.main,
            probe=acc.probe,
            forced=acc.forced,
            duration_s=time.monotonic() - started,
            ttft_s=None if acc.first_token_at is None else acc.first_token_at - started,
            probe_durations=session.probes.stats.durations if session.probes is not None else (),
        )
    except Exception:
        log.exception("recording metrics failed for request %s", session.ctx.request_id)
