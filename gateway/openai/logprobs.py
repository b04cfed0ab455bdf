"""Main-stream top logprobs for policies that read them (``brake``): how to ask, and how to read them.

The two OpenAI shapes differ: completions take ``logprobs: K`` and answer
with parallel ``tokens`` / ``token_logprobs`` / ``top_logprobs`` lists; chat
takes ``logprobs: true, top_logprobs: K`` and answers with ``content``, one
entry per token with its own ``top_logprobs`` list.

A client may ask for logprobs itself, with fewer (or no) top alternatives
than the policy reads. The engine is then asked for the larger count
(``merged_request``) and each chunk is cut back to what the client asked for
(``trim``), so the policy works and the client gets the shape it requested.
"""

from __future__ import annotations

import math
from typing import Any

from gateway.errors import InvalidRequest
from gateway.openai.protocol import Endpoint
from policies.base import TokenChoice


def logprob_request(endpoint: Endpoint, k: int) -> dict[str, Any]:
    """The engine request fields that return the top ``k`` alternatives of every token."""
    if endpoint == "chat":
        return {"logprobs": True, "top_logprobs": k}
    return {"logprobs": k}


MAX_CLIENT_TOP = 20  # vLLM's default --max-logprobs


def client_top(endpoint: Endpoint, body: dict[str, Any]) -> int | None:
    """How many top alternatives per token the client asked for: None if it asked for no logprobs at all."""
    if endpoint == "chat":
        asked = body.get("logprobs")
        if asked is None or asked is False:
            return None
        if asked is not True:
            raise InvalidRequest("logprobs must be a boolean.", param="logprobs")
        return _count(body.get("top_logprobs", 0) if body.get("top_logprobs") is not None else 0, "top_logprobs")
    asked = body.get("logprobs")
    return None if asked is None or asked is False else _count(asked, "logprobs")


def _count(value: Any, param: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_CLIENT_TOP:
        raise InvalidRequest(f"{param} must be an integer in 0..{MAX_CLIENT_TOP}.", param=param)
    return value


def merged_request(endpoint: Endpoint, body: dict[str, Any], k: int) -> int | None:
    """Ask the engine for at least ``k`` top alternatives per token, keeping the client's larger count.

    Returns the client's own count (None: it asked for no logprobs), for ``trim``.
    """
    asked = client_top(endpoint, body)
    body.update(logprob_request(endpoint, max(k, asked or 0)))
    return asked


def trim(logprobs: Any, k: int) -> Any:
    """One chunk's logprobs cut back to the top ``k`` alternatives per token, either shape."""
    if not isinstance(logprobs, dict):
        return logprobs
    out = dict(logprobs)
    content = logprobs.get("content")
    if isinstance(content, list):
        out["content"] = [
            {**e, "top_logprobs": (e.get("top_logprobs") or [])[:k]} if isinstance(e, dict) else e for e in content
        ]
        return out
    tokens, tops = logprobs.get("tokens"), logprobs.get("top_logprobs")
    if isinstance(tops, list):
        cut = []
        for i, top in enumerate(tops):
            if not isinstance(top, dict):
                cut.append(top)
                continue
            keep = dict(sorted(top.items(), key=lambda kv: -_num(kv[1]))[:k])
            token = tokens[i] if isinstance(tokens, list) and i < len(tokens) else None
            if token in top:  # vLLM lists the sampled token too, top or not
                keep[token] = top[token]
            cut.append(keep)
        out["top_logprobs"] = cut
    return out


def token_choices(logprobs: Any) -> tuple[TokenChoice, ...] | None:
    """The tokens of one chunk with their top alternatives, either shape; None when there are none."""
    if not isinstance(logprobs, dict):
        return None
    out: list[TokenChoice] = []
    content = logprobs.get("content")
    if isinstance(content, list):
        for entry in content:
            if not isinstance(entry, dict):
                continue
            alts = entry.get("top_logprobs") or []
            top = {a["token"]: _num(a.get("logprob")) for a in alts if isinstance(a, dict) and "token" in a}
            out.append(TokenChoice(str(entry.get("token", "")), _num(entry.get("logprob")), top))
        return tuple(out) or None
    tokens, values, tops = logprobs.get("tokens"), logprobs.get("token_logprobs"), logprobs.get("top_logprobs")
    if not isinstance(tokens, list):
        return None
    for i, token in enumerate(tokens):
        value = values[i] if isinstance(values, list) and i < len(values) else None
        top = tops[i] if isinstance(tops, list) and i < len(tops) and isinstance(tops[i], dict) else {}
        out.append(TokenChoice(str(token), _num(value), {str(t): _num(v) for t, v in top.items()}))
    return tuple(out) or None


def _num(value: Any) -> float:
    """A logprob as a float; missing or non-finite ones (vLLM sends -inf as -9999.0 or null) are -inf."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return -math.inf
    return number if math.isfinite(number) else -math.inf
