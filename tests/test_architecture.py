"""Layering rules from DESIGN.md that the code must keep."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
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


# -- the module graph -------------------------------------------------------------------------------------

LAYERED = ("gateway", "policies", "loadtest")
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def every_import(path: Path) -> set[str]:
    """Every module ``path`` imports, wherever the import is (late imports in functions and
    ``if TYPE_CHECKING:`` blocks too): an import hidden in a function still ties the two modules together.
    Relative imports are resolved; ``from package import name`` counts ``package.name`` when that is a module."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = [p for top in LAYERED for p in (REPO / top).rglob("*.py")]
    modules = {module_name(p): p for p in paths}
    return {name: {m for m in every_import(path) if m in modules and m != name} for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles_in_gateway_policies_and_loadtest() -> None:
    """Issue 15: a cycle (gateway/cli.py <-> gateway/demo.py through a late import) hides which module is the
    lower layer; every import counts, a package's ``__init__`` counts as its own module."""
    graph = import_graph()
    # A package's __init__ re-exports its modules; a module that imports its own package is not a cycle.
    for name, deps in graph.items():
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    assert cycles(graph) == []


def test_the_cycle_finder_sees_a_cycle_through_a_late_import() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_module_over_500_lines() -> None:
    """STYLE habit 1: one concept per module, roughly 500 lines or less."""
    lengths = {
        str(path.relative_to(REPO)): len(path.read_text().splitlines())
        for top in LAYERED
        for path in (REPO / top).rglob("*.py")
    }
    too_long = {path: n for path, n in lengths.items() if n > MAX_LINES}
    assert too_long == {}


def test_no_test_module_imports_another() -> None:
    """Shared helpers live in tests/support/ and shared fixtures in tests/conftest.py, so a test module
    never imports another (its fixtures and its tests would run again under the importer's name)."""
    offenders: dict[str, list[str]] = {}
    for path in (REPO / "tests").rglob("*.py"):
        files = {
            m: REPO.joinpath(*m.split(".")).with_suffix(".py") for m in every_import(path) if m.startswith("tests.")
        }
        bad = sorted(m for m, f in files.items() if f.is_file() and f.name.startswith(("test_", "conftest")))
        if bad:
            offenders[str(path.relative_to(REPO))] = bad
    assert offenders == {}


def test_every_gateway_error_is_drawn_in_the_tree_of_errors_py() -> None:
    """The one exception tree (DESIGN decision 6) is drawn in gateway/errors.py's docstring, like httpx's:
    every ``GatewayError`` subclass, wherever it is defined, appears there by name."""
    import gateway
    from gateway import errors

    for info in pkgutil.walk_packages(gateway.__path__, "gateway."):
        importlib.import_module(info.name)
    found: set[type] = set()
    todo: list[type] = [errors.GatewayError]
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo.extend(set(cls.__subclasses__()) - found)
    drawn = set(re.findall(r"^[\s│├└─]*(\w+)\s+\(", errors.__doc__ or "", flags=re.M))
    assert {f"{c.__module__}.{c.__name__}" for c in found if c.__name__ not in drawn} == set()
