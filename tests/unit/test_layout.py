"""The house rules of the source tree, read from the code's own imports (ast; nothing is imported or run).

- ``workers/`` holds only what runs as the worker processes; the main process imports from it nothing but the
  entry-point functions it hands to ``Process(target=...)``, and only from ``pipeline/run/``.
- No library module imports up into the run orchestration (``pipeline.run``) or the CLI (``pipeline.cli``).
- No import circles between modules, function-level imports included.
- Every package directory is listed in ``pyproject.toml``'s package list (else the wheel misses it).
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOP = ("pipeline", "workers")


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for top in TOP:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import statement of the file, nested ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def _resolve(name: str, names: list[str]) -> set[str]:
    """The project modules an import statement loads (``from pkg import mod`` loads ``pkg.mod``)."""
    hits = {name} if name in MODULES else set()
    hits.update(f"{name}.{n}" for n in names if f"{name}.{n}" in MODULES)
    return hits


def _graph() -> dict[str, set[str]]:
    return {mod: set().union(*[_resolve(n, ns) for n, ns in _imports(path)] or [set()]) - {mod}
            for mod, path in MODULES.items()}


def test_the_tree_has_the_process_roles():
    for pkg in ("pipeline.cli", "pipeline.run", "pipeline.servers", "pipeline.store", "pipeline.retrieval",
                "pipeline.corpus", "pipeline.llm", "pipeline.output", "pipeline.evaluation", "pipeline.dataset",
                "pipeline.slurm", "workers"):
        assert pkg in MODULES, f"missing package {pkg}"


def test_main_process_imports_only_worker_entry_points():
    for mod, path in MODULES.items():
        if not mod.startswith("pipeline"):
            continue
        for name, names in _imports(path):
            if name.split(".")[0] != "workers":
                continue
            assert mod.startswith("pipeline.run"), f"{mod} imports {name}: only the run starts worker processes"
            assert names and all(n.endswith("_main") for n in names), \
                f"{mod} imports {names} from {name}: only the worker entry points (*_main) may be imported"


@pytest.mark.parametrize("upper", ["pipeline.run", "pipeline.cli"])
def test_library_does_not_import_up(upper):
    allowed = {"pipeline.run": ("pipeline.run", "pipeline.cli"), "pipeline.cli": ("pipeline.cli", "pipeline.__main__")}
    for mod, deps in _graph().items():
        if mod.startswith(allowed[upper]) or mod.startswith("workers"):
            continue
        bad = sorted(d for d in deps if d == upper or d.startswith(upper + "."))
        assert not bad, f"{mod} imports {bad}: a library module must not import the {upper} layer"


def test_no_import_circles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            # a package's __init__ importing its own submodules is not a circle of concerns
            if d.startswith(m + "."):
                continue
            if state.get(d) == 1:
                circles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_every_package_is_in_the_wheel():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {mod for mod, path in MODULES.items() if path.name == "__init__.py"}
    assert packages <= listed, f"not in pyproject.toml's packages: {sorted(packages - listed)}"
