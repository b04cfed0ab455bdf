"""Side requests that continue the main generation (probes, forced answers) in the request's own format.

Completions: the raw prompt, the text generated so far, then a suffix from
the route. Chat: the same messages plus a partial assistant message holding
the text and the suffix, continued in place (vLLM's ``continue_final_message``;
templates that strip the reasoning use gateway/stopping/rendered.py).
Delimiters and suffixes are route settings, never a model's template.

With a reasoning parser the continued text is ``think_open`` plus the
reasoning: the parser swallowed the delimiter the model wrote, and putting it
back continues the very token sequence, so the continuation streams as
``content``.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import InvalidRequest
from gateway.openai.chunks import REASONING_FIELDS, reasoning_of
from gateway.openai.protocol import ChatCompletionRequest, CompletionRequest

# Sampling fields a continuation inherits from the client's request.
_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty", "presence_penalty")
# vLLM's chat-template fields of a chat request.
_TEMPLATE = ("chat_template", "chat_template_kwargs", "tools")


def text_prompt(request: CompletionRequest) -> str:
    """The single text prompt that continuations extend; others can't be continued."""
    prompt = request.prompt
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    raise InvalidRequest(
        "Early stopping needs a single text prompt; use stopgate.policy 'none' for token or batch prompts.",
        param="prompt",
    )


def sampling_body(
    request: CompletionRequest | ChatCompletionRequest, upstream_model: str, *, max_tokens: int, greedy: bool
) -> dict[str, Any]:
    """A side generation's request less its prompt: streamed with usage, sampling as the client's (or greedy)."""
    body: dict[str, Any] = {"model": upstream_model, "max_tokens": max_tokens, "n": 1, "stream": True}
    body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    client = request.model_dump(exclude_unset=True)
    if "priority" in client:  # vLLM's scheduling priority: side generations inherit the request's
        body["priority"] = client["priority"]
    if greedy:
        body["temperature"] = 0.0
    else:
        body.update({k: client[k] for k in _SAMPLING if k in client})
    return body


def template_fields(request: ChatCompletionRequest) -> dict[str, Any]:
    """The client's chat-template fields: a continuation renders with the template the request used."""
    client = request.model_dump(exclude_unset=True)
    return {k: client[k] for k in _TEMPLATE if k in client}


def continuation_body(
    request: CompletionRequest | ChatCompletionRequest,
    upstream_model: str,
    generated: str,
    suffix: str,
    *,
    max_tokens: int,
    greedy: bool,
    logprobs: bool,
) -> dict[str, Any]:
    body = sampling_body(request, upstream_model, max_tokens=max_tokens, greedy=greedy)
    if isinstance(request, CompletionRequest):
        body["prompt"] = text_prompt(request) + generated + suffix
        if logprobs:
            body["logprobs"] = 1
    else:
        messages = [m.model_dump(exclude_unset=True) for m in request.messages]
        messages.append({"role": "assistant", "content": generated + suffix})
        body["messages"] = messages
        body.update(template_fields(request))
        body["add_generation_prompt"] = False
        body["continue_final_message"] = True
        if logprobs:
            body["logprobs"] = True
    return body


def token_logprobs(logprobs: Any) -> list[float]:
    """The sampled tokens' log probabilities from a chunk's ``logprobs``, either API shape."""
    if not isinstance(logprobs, dict):
        return []
    if isinstance(logprobs.get("content"), list):
        return [float(t["logprob"]) for t in logprobs["content"] if isinstance(t, dict) and "logprob" in t]
    values = logprobs.get("token_logprobs")
    if isinstance(values, list):
        return [float(v) for v in values if v is not None]
    return []


def split_suffix(suffix: str, think_close: str) -> tuple[str, str]:
    """A suffix as a parser-shaped client sees it: (the reasoning's end, the answer's start), no delimiter."""
    before, close, after = suffix.partition(think_close)
    return (before, after) if close else ("", suffix)


def as_answer(chunk: dict[str, Any]) -> None:
    """A forced answer's chat chunk with all its text in ``content``.

    Whether a reasoning parser files a continuation's output under reasoning or content is the engine's
    call (vLLM 0.32 streams it as content, but its non-streamed form says reasoning): here it is the answer.
    """
    for choice in chunk["choices"]:
        delta = choice.get("delta") or {}
        _, reasoning = reasoning_of(delta)
        if reasoning:
            out = {k: v for k, v in delta.items() if k not in REASONING_FIELDS}
            out["content"] = reasoning + str(delta.get("content") or "")
            choice["delta"] = out
