"""Which engine fields a client may send, and how large (issue 14).

The request models declare only what the gateway acts on; every other field
passes through to the engine. That is how vLLM's extensions keep working, but
some fields multiply the engine's work or reorder its queue. Each is decided
here, before any I/O, with a 400 that names the field:

* ``prompt`` as a batch: at most ``max_batch_prompts`` prompts;
* ``stop``: at most ``MAX_STOP_STRINGS`` strings of ``MAX_STOP_CHARS`` each;
  ``stop_token_ids`` at most ``MAX_STOP_STRINGS`` ids;
* ``logprobs`` (completions), ``top_logprobs`` (chat), ``prompt_logprobs``: at
  most ``MAX_LOGPROBS`` (vLLM's own default ``max_logprobs``);
* ``best_of``: at most ``max_n``, like ``n``; ``logit_bias``: at most
  ``MAX_LOGIT_BIAS`` entries;
* ``priority`` (the engine's queue order is the gateway's to set: evaluation
  work runs behind live traffic) and ``ignore_eos`` (generate to the limit
  whatever the model says) are refused unless the route lists them in its
  ``client_fields``.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import InvalidRequest, LimitExceeded
from gateway.openai.protocol import ChatCompletionRequest, CompletionRequest

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 300
# Fields only the routes file can open to clients (RouteConfig.client_fields).
GATEWAY_FIELDS = frozenset({"priority", "ignore_eos"})


def prompt_count(request: CompletionRequest | ChatCompletionRequest) -> int:
    """Prompts in the request: a list of strings or of token-id lists is a batch; one flat id list is one prompt."""
    if isinstance(request, CompletionRequest) and isinstance(request.prompt, list) and request.prompt:
        return 1 if isinstance(request.prompt[0], int) else len(request.prompt)
    return 1


def check_client_fields(
    request: CompletionRequest | ChatCompletionRequest,
    body: dict[str, Any],
    *,
    allowed: tuple[str, ...],
    max_n: int,
    max_batch_prompts: int,
) -> None:
    """Refuse, naming the field, what a client may not send or sends too much of (``body``: the pass-through)."""
    prompts = prompt_count(request)
    if prompts > max_batch_prompts:
        raise LimitExceeded(
            f"prompt holds {prompts} prompts; the limit is {max_batch_prompts} (max_batch_prompts).", param="prompt"
        )
    for name in sorted(GATEWAY_FIELDS & set(body) - set(allowed)):
        raise InvalidRequest(f"'{name}' is set by the gateway, not by clients, on this route.", param=name)
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise InvalidRequest("'stop' must be a string or a list of strings.", param="stop")
        if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise LimitExceeded(
                f"'stop' takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters.",
                param="stop",
            )
    ids = body.get("stop_token_ids")
    if isinstance(ids, list) and len(ids) > MAX_STOP_STRINGS:
        raise LimitExceeded(f"'stop_token_ids' takes at most {MAX_STOP_STRINGS} ids.", param="stop_token_ids")
    for name in ("logprobs", "top_logprobs", "prompt_logprobs"):
        value = body.get(name)
        if isinstance(value, bool) or value is None:
            continue  # chat's `logprobs: true`
        if not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS:
            raise LimitExceeded(f"'{name}' must be an integer from 0 to {MAX_LOGPROBS}.", param=name)
    best_of = body.get("best_of")
    if best_of is not None and (isinstance(best_of, bool) or not isinstance(best_of, int) or not 1 <= best_of <= max_n):
        raise LimitExceeded(f"best_of={best_of!r} must be an integer from 1 to {max_n} (max_n).", param="best_of")
    bias = body.get("logit_bias")
    if isinstance(bias, dict) and len(bias) > MAX_LOGIT_BIAS:
        raise LimitExceeded(f"'logit_bias' takes at most {MAX_LOGIT_BIAS} entries.", param="logit_bias")
