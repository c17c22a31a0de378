"""The import map: every import of the gateway's own code points down the layers, and none goes round in a
circle.

The layers, from the ground up:

0. `core`: settings, errors, the server's plumbing. Imports nothing of the project.
1. `db`, `cluster`: the storage layer (models, engine, migrations), and the short-lived state replicas share
   in Redis (the link and its health).
2. `audit`, `auth`, `uploads`, `upstream`, `usage`: the domain (the trail of admin actions, people and
   credentials, stored files, talking to Ollama, what each person used and may still use).
   Siblings: one may use another, as long as no two packages end up importing each other.
3. `fleet`, `observe`: the Ollama hosts, their slots and the fair queue in front of them (uses `upstream` to
   ask them); what operators watch (the access log, metrics).
4. `routes`: the web layer (routers, their dependencies, the credentials guard, the relay endpoints).
5. `services`: the composition root, which builds every store and client.
6. `main`, `manage`: what starts the gateway, and the command-line tool.

A module may import from its own layer or any layer below it. Tests and the bench stand outside the layers.
"""

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS: list[frozenset[str]] = [
    frozenset({"core"}),
    frozenset({"db", "cluster"}),
    frozenset({"audit", "auth", "uploads", "upstream", "usage"}),
    frozenset({"fleet", "observe"}),
    frozenset({"routes"}),
    frozenset({"services"}),
    frozenset({"main", "manage"}),
]
LAYER_OF = {name: level for level, names in enumerate(LAYERS) for name in names}
OUTSIDE = frozenset({"tests", "bench"})


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_modules() -> dict[str, Path]:
    modules = {_module_name(path): path for path in ROOT.glob("*.py")}
    for package in sorted(ROOT.iterdir()):
        if (package / "__init__.py").is_file() and package.name not in OUTSIDE:
            modules.update({_module_name(path): path for path in package.rglob("*.py")})
    return modules


MODULES = _project_modules()


def _imports(module: str, path: Path) -> Iterator[tuple[int, str]]:
    """(line, module imported) for every import of project code, wherever it stands in the file (inside a
    function or under TYPE_CHECKING too)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from routes import admin` imports the module routes.admin.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names
            ]
        else:
            continue
        for target in dict.fromkeys(targets):
            if target.split(".")[0] in LAYER_OF or target in MODULES:
                yield node.lineno, target


GRAPH = {module: sorted({target for _, target in _imports(module, path)}) for module, path in MODULES.items()}


def _top(module: str) -> str:
    return module.split(".")[0]


def _cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node, or with a node importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph.get(node, ()):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_layers_name_every_top_level_module() -> None:
    unplaced = sorted({_top(module) for module in MODULES} - LAYER_OF.keys())
    assert not unplaced, f"place these in a layer (tests/test_layers.py): {unplaced}"


def test_layers_no_import_runs_back_up() -> None:
    upward = [
        f"{MODULES[module].relative_to(ROOT)}:{line} ({module}, layer {LAYER_OF[_top(module)]}) imports "
        f"{target} (layer {LAYER_OF[_top(target)]})"
        for module, path in MODULES.items()
        if _top(module) in LAYER_OF
        for line, target in _imports(module, path)
        if LAYER_OF[_top(target)] > LAYER_OF[_top(module)]
    ]
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_layers_no_module_cycles() -> None:
    assert not _cycles(GRAPH)


def test_layers_no_package_cycles() -> None:
    packages: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        packages.setdefault(_top(module), set()).update(
            _top(target) for target in targets if _top(target) != _top(module)
        )
    assert not _cycles({package: sorted(targets) for package, targets in packages.items()})


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        pytest.param("import core.errors", ["core.errors"], id="import"),
        pytest.param("from routes import guard", ["routes.guard"], id="from-package-import-module"),
        pytest.param("from core.errors import GatewayError", ["core.errors"], id="from-module-import-name"),
        pytest.param("def f():\n    from auth.users import User", ["auth.users"], id="inside-a-function"),
        pytest.param("from . import guard", ["routes.guard"], id="relative"),
        pytest.param("import json\nfrom fastapi import FastAPI", [], id="not-the-project"),
    ],
)
def test_layers_imports_are_all_found(tmp_path: Path, source: str, expected: list[str]) -> None:
    (tmp_path / "routes").mkdir()
    path = tmp_path / "routes" / "example.py"
    path.write_text(source)
    assert [target for _, target in _imports("routes.example", path)] == expected


def test_layers_cycles_are_found() -> None:
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert _cycles({"a": ["b"], "b": []}) == []
