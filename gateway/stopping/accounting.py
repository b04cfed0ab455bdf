"""Net tokens of one request, by kind (DESIGN decision 4): what the response extension and the metrics report."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Accounting:
    """Net tokens of one request, by kind (DESIGN decision 4)."""

    prompt: int = 0
    thinking: int = 0
    answer: int = 0
    forced_prompt: int = 0
    forced: int = 0
    probe_prompt: int = 0
    probe: int = 0
    first_token_at: float | None = None
    stop_reason: str | None = None

    @property
    def main(self) -> int:
        return self.thinking + self.answer

    @property
    def completion(self) -> int:
        """What the client sees generated: the main stream and the forced answer."""
        return self.main + self.forced

    @property
    def net(self) -> int:
        """Everything the engine generated for this request."""
        return self.main + self.forced + self.probe

    def tokens(self) -> dict[str, int]:
        """Tokens by kind, as the response extension reports them."""
        return {
            "prompt": self.prompt,
            "thinking": self.thinking,
            "answer": self.answer,
            "probe_prompt": self.probe_prompt,
            "probe": self.probe,
            "forced_prompt": self.forced_prompt,
            "forced": self.forced,
            "net": self.net,
        }
