"""Waiting for what a server does in the background: poll a condition, never sleep a fixed time."""

from __future__ import annotations

import time
from typing import Any


def wait_until(cond: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return bool(cond())
