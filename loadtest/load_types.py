"""What one load run is given and what it gives back: targets, the config, per-request records, results.

Plain data shared by the runner (``loadtest/runner.py``), the statistics (``loadtest/stats.py``) and the
command line (``loadtest/load.py``), so that none of them imports another to name a type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

MAX_REQUESTS = 1_000_000


@dataclass
class Record:
    """One request as the client saw it; ``error`` is "" when it succeeded."""

    target: str
    step: int
    seq: int  # order of sending within the target's step
    item: int  # index of the prompt
    start_s: float  # (scheduled) send time since the step began
    lag_s: float = 0.0  # how late the client actually sent it
    e2e_s: float | None = None
    ttft_s: float | None = None
    output_tokens: int | None = None
    chunks: int = 0  # streamed chunks that carried text
    itl_s: list[float] = field(default_factory=list)
    error: str = ""
    status: int | None = None
    correct: float | None = None  # EM against the item's answers, if it has any
    stop_reason: str | None = None
    tokens: dict[str, int] | None = None  # the gateway's stopgate.tokens
    usage: dict[str, int] | None = None

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def tpot_s(self) -> float | None:
        return tpot(self.e2e_s, self.ttft_s, self.output_tokens)


def tpot(e2e_s: float | None, ttft_s: float | None, output_tokens: int | None) -> float | None:
    """(E2E - TTFT) / (output tokens - 1); None when it is undefined."""
    if e2e_s is None or ttft_s is None or output_tokens is None or output_tokens < 2:
        return None
    return (e2e_s - ttft_s) / (output_tokens - 1)


@dataclass(frozen=True)
class Target:
    name: str
    url: str  # base URL, no trailing /v1
    body: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadConfig:
    """One invocation. ``steps[k][i]`` is the rate or concurrency of target ``i`` in step ``k``."""

    targets: tuple[Target, ...]
    mode: Literal["rate", "concurrency"]
    steps: tuple[tuple[float, ...], ...]
    duration_s: float = 10.0
    requests: int | None = None  # per target and step
    block_s: float = 2.0
    drain_s: float = 60.0
    timeout_s: float = 300.0
    max_in_flight: int = 256
    api: Literal["completions", "chat"] = "completions"
    stream: bool = True
    model: str = "tinyreason"
    max_tokens: int | None = None
    temperature: float | None = 0.0
    seed: int = 0
    extractor: str = "gsm8k"
    extractor_pattern: str | None = None
    normalizer: str = "number"
    progress: bool = True
    api_key: str | None = field(default=None, repr=False)  # sent as a bearer token, never written out

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def describe(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("targets", "api_key")}
        out["targets"] = [{"name": t.name, "url": t.url, "body": t.body} for t in self.targets]
        return out


@dataclass
class StepResult:
    step: int
    levels: dict[str, float]
    seconds: dict[str, float]  # load offered to each target
    wall_s: float


@dataclass
class LoadResult:
    config: LoadConfig
    prompts: int
    records: list[Record]
    steps: list[StepResult]
    complete: bool
    started: str
    elapsed_s: float
