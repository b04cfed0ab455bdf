"""Helpers that several test modules share, grouped by concept; no tests live here.

A test module imports from ``tests.support``, never from another test module (tests/test_architecture.py
checks that). Fixtures that several modules share live in tests/conftest.py instead.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
