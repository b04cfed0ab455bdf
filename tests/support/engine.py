"""Scripting the fake engine (loadtest/fake_engine.py): which kind of request the gateway sent."""

from __future__ import annotations


def kind(headers: dict[str, str]) -> str:
    rid = headers.get("x-request-id", "")
    return "forced" if rid.endswith("-forced") else "probe" if "-probe" in rid else "main"
