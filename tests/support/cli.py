"""Running ``stopgate`` as a child process, as an operator would."""

from __future__ import annotations

import os
import subprocess
import sys

STOPGATE = [sys.executable, "-m", "gateway.cli"]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*STOPGATE, *args], capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}
    )


def assert_clean_failure(proc: subprocess.CompletedProcess[str], says: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert says in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
