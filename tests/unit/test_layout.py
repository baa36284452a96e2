"""The tree's rules, checked on the source (nothing is imported): no import cycle, no module
over 400 lines, and the planes import only what they may.

- An import cycle (``a`` imports ``b`` imports ``a``), even one broken at run time by a late
  import inside a function, means neither module can be read or changed alone.
- The control plane (tsfleet/control, tsfleet/k8s, the CLI) takes from handlers/ only
  handlers/contract.py, the torch-free file names and pid check both sides share: a
  ``tsfleet status`` must not load torch and a model handler.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("tsfleet", "handlers", "benchmarks")
SIZED = ("tsfleet", "handlers", "benchmarks", "scripts", "archive_scripts")
GENERATED = ("tsfleet/router/proto/",)
MAX_LINES = 400
CONTROL = ("tsfleet.control", "tsfleet.k8s", "tsfleet.cli", "tsfleet.manifest", "tsfleet.errors", "tsfleet.files")
CONTROL_MAY_IMPORT = {"handlers.contract"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
            if not any(str(p.relative_to(ROOT)).startswith(g) for g in GENERATED)}


def _imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (late imports count)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]) if node.level else node.module
            base = (base or "").strip(".")
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            # A module's own packages run first anyway: importing them is not a cycle.
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imported(name, path, set(modules)) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle_and_nothing_else() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle() -> None:
    graph = import_graph()
    assert "tsfleet.control.apply" in graph and "handlers.base" in graph, "the walk found the packages"
    assert cycles(graph) == [], "modules that import each other (late imports count)"


def test_no_module_over_400_lines() -> None:
    long = {}
    for pkg in SIZED:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = str(path.relative_to(ROOT))
            if not rel.startswith(GENERATED) and (n := len(path.read_text().splitlines())) > MAX_LINES:
                long[rel] = n
    assert long == {}, f"split these (at most {MAX_LINES} lines a module)"


def test_the_control_plane_takes_from_handlers_only_the_shared_contract() -> None:
    graph = import_graph()
    reaching = {name: sorted(t for t in targets if t.startswith("handlers") and t not in CONTROL_MAY_IMPORT)
                for name, targets in graph.items() if name.startswith(CONTROL)}
    assert {k: v for k, v in reaching.items() if v} == {}


def test_the_contract_is_torch_free() -> None:
    tree = ast.parse((ROOT / "handlers" / "contract.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"__future__", "os", "tempfile", "pathlib"}
