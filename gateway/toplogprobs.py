"""Main-stream top logprobs for policies that read them (``brake``): how to ask, and how to read them.

The two OpenAI shapes differ: completions take ``logprobs: K`` and answer
with parallel ``tokens`` / ``token_logprobs`` / ``top_logprobs`` lists; chat
takes ``logprobs: true, top_logprobs: K`` and answers with ``content``, one
entry per token with its own ``top_logprobs`` list.
"""

from __future__ import annotations

import math
from typing import Any

from gateway.protocol import Endpoint
from policies.base import TokenChoice


def logprob_request(endpoint: Endpoint, k: int) -> dict[str, Any]:
    """The engine request fields that return the top ``k`` alternatives of every token."""
    if endpoint == "chat":
        return {"logprobs": True, "top_logprobs": k}
    return {"logprobs": k}


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
