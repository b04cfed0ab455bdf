"""``cue``: stop the reasoning when the model writes a stop cue (a plain string such as ``\\ncheck\\n``).

Reasoning models announce that they have the answer and turn to re-checking
it ("Wait, let me double-check", "Let me verify"); everything after such a
cue is overthinking when the answer was right. ``cues`` lists the strings;
the first one seen in the reasoning stops it and the session forces the
answer. The cues are plain strings (no regular expressions), so a vLLM
engine is handed them as stop strings (``engine_params``) and ends the
sequence at the cue itself instead of generating on until the gateway's
disconnect reaches it. ``loadtest/cues.py`` mines the cues of a route from
its reference items (``stopgate tune ROUTE --mine-cues``).

A list of cues also makes a strictness ladder for the controller (fewer cues
stop later): ``control.strictness: {param: cues, values: [[a, b], [a]]}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from policies.base import CONTINUE, Decision, PolicyError, ProbeResult, TokenEvent, stop

MAX_CUES = 16
MAX_CUE_CHARS = 64


@dataclass
class CuePolicy:
    cues: tuple[str, ...]
    name: str = field(default="cue", init=False)
    wants_logprobs: bool = field(default=False, init=False)
    engine_logprobs: int = field(default=0, init=False, repr=False)
    _longest: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if not 1 <= len(self.cues) <= MAX_CUES:
            raise PolicyError(f"cues: between 1 and {MAX_CUES} strings, got {len(self.cues)}")
        for cue in self.cues:
            if not 1 <= len(cue) <= MAX_CUE_CHARS:
                raise PolicyError(f"cues: each between 1 and {MAX_CUE_CHARS} characters, got {cue!r}")
        self._longest = max(len(c) for c in self.cues)

    @property
    def engine_params(self) -> dict[str, Any]:
        """Stop-string fields for a vLLM engine; the text keeps the cue, so the policy sees it too."""
        return {"stop": list(self.cues), "include_stop_str_in_output": True}

    def on_tokens(self, event: TokenEvent) -> Decision:
        if event.phase != "thinking":
            return CONTINUE
        # Only text that could hold a cue completed by this event: the new text and a cue's length before it.
        recent = event.text[-(len(event.new_text) + self._longest) :]
        if any(cue in recent for cue in self.cues):
            return stop("cue")
        return CONTINUE

    def on_probe(self, result: ProbeResult) -> Decision:
        return CONTINUE
