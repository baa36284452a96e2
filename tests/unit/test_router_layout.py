"""The router's tree keeps its planes apart: no import cycles (type-only and in-function
imports included), the wire knows no policy or front, the policy no wire or front."""
from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROUTER = Path(__file__).resolve().parents[2] / "tsfleet" / "router"


def _imports() -> dict[str, set[str]]:
    """Each router module -> the router modules it imports, anywhere in its text."""
    graph: dict[str, set[str]] = {}
    for path in ROUTER.rglob("*.py"):
        if "proto" in path.relative_to(ROUTER).parts:
            continue  # generated code
        name = ".".join(("tsfleet", "router", *path.relative_to(ROUTER).with_suffix("").parts))
        name = name.removesuffix(".__init__")
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tsfleet.router"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("tsfleet.router"))
        graph[name] = deps
    return {name: {d for d in deps if d in graph and d != name} for name, deps in graph.items()}


def test_no_module_of_the_router_imports_itself_back() -> None:
    graph = _imports()
    # A package's __init__ imports nothing here, so its edges would only hide cycles.
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")


@pytest.mark.parametrize("plane, allowed", [
    ("wire", {"wire"}),
    ("policy", {"policy"}),
])
def test_a_plane_imports_only_itself(plane: str, allowed: set[str]) -> None:
    bad = [(name, dep) for name, deps in _imports().items() if name.startswith(f"tsfleet.router.{plane}.")
           for dep in deps if dep.split(".")[2] not in allowed]
    assert bad == []


def test_no_router_module_is_over_400_lines() -> None:
    long = {str(p.relative_to(ROUTER)): n for p in ROUTER.rglob("*.py")
            if "proto" not in p.parts and (n := len(p.read_text().splitlines())) > 400}
    assert long == {}
