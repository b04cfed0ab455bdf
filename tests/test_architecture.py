"""Layering rules from DESIGN.md that the code must keep."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_policies_never_import_gateway() -> None:
    offenders = {
        str(path.relative_to(REPO)): sorted(m for m in imported_modules(path) if m.split(".")[0] == "gateway")
        for path in (REPO / "policies").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_policies_do_no_io() -> None:
    """Policies are pure: no network, no files, no clocks, no async."""
    banned = {"httpx", "asyncio", "socket", "os", "time", "anyio", "subprocess"}
    for path in (REPO / "policies").rglob("*.py"):
        used = {m.split(".")[0] for m in imported_modules(path)} & banned
        assert not used, f"{path.name} imports {used}"


def test_gateway_builds_no_app_at_import_time() -> None:
    """create_app is the only way to build the app: no module-level app object."""
    for path in (REPO / "gateway").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "app" for t in node.targets):
                raise AssertionError(f"{path.name} builds an app at import time")


def test_the_controller_is_a_pure_step_function() -> None:
    """DESIGN decision 3: the controller does no I/O; the plane and the store do."""
    used = {m.split(".")[0] for m in imported_modules(REPO / "gateway" / "control" / "controller.py")}
    assert used <= {"__future__", "math", "dataclasses", "typing", "collections"}, used
