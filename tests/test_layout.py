"""Imports run one way: iet_agc (the command) -> fl_app (the Flower app) -> strategies, clients,
evaluation -> ddpm (the shared core)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "ddpm": set(),
    "strategies": {"ddpm"},
    "clients": {"ddpm"},
    "evaluation": {"ddpm"},
    "fl_app": {"ddpm", "strategies", "clients", "evaluation"},
    "iet_agc": {"ddpm", "strategies", "clients", "evaluation", "fl_app"},
}


def _project_imports(path: Path) -> set[str]:
    return _imported_modules(path) & set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_run_one_way(package):
    for path in (ROOT / package).glob("*.py"):
        bad = _project_imports(path) - ALLOWED[package] - {package}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def _imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", ["ddpm", "clients", "evaluation", "iet_agc"])
def test_flower_stays_in_the_glue(package):
    """Flower is imported only by fl_app/ and strategies/: the method and the metric run without it,
    and the command reaches Flower through the app (fl_app.simulation) or flwr's own CLI."""
    for path in (ROOT / package).glob("*.py"):
        assert "flwr" not in _imported_modules(path), f"{path.relative_to(ROOT)} imports flwr"


def test_no_test_helpers_in_the_package():
    for package in [*ALLOWED, "deploy", "scripts", "examples"]:
        for path in (ROOT / package).glob("*.py"):
            assert "unittest" not in _imported_modules(path), f"{path.relative_to(ROOT)} imports unittest"


def _sibling_imports(path: Path, package: str, siblings: set[str]) -> set[str]:
    """The modules of ``package`` that ``path`` imports anywhere (top level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            parts = [a.name.split(".") for a in node.names]
            found |= {p[1] for p in parts if len(p) > 1 and p[0] == package}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1 or (node.level == 0 and node.module and node.module.split(".")[0] == package):
                module = (node.module or "").split(".")[node.level == 0 :]
                if module:
                    found.add(module[0])
                else:  # from . import x, from package import x
                    found |= {a.name for a in node.names}
    return found & siblings - {path.stem}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_import_circle_among_a_packages_modules(package):
    """Each folder's modules import each other one way: the graph of their imports, function-level
    ones included (where a circle would hide), has no cycle."""
    paths = {p.stem: p for p in (ROOT / package).glob("*.py") if p.stem != "__init__"}
    graph = {name: _sibling_imports(path, package, set(paths)) for name, path in paths.items()}
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            cycle = " -> ".join([*trail[trail.index(name) :], name])
            pytest.fail(f"{package}/ import circle: {cycle}")
        if name not in done:
            for other in sorted(graph[name]):
                visit(other, [*trail, name])
            done.add(name)

    for name in sorted(graph):
        visit(name, [])


MAX_FUNCTION_LINES = 60


@pytest.mark.parametrize("package", [*sorted(ALLOWED), "deploy"])
def test_no_function_longer_than_60_lines(package):
    """Package functions stay small enough to read at once: decorators, signature and code count;
    the docstring does not (public entry points document every parameter, as Flower's do)."""
    long = []
    for path in sorted((ROOT / package).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                doc = node.body[0] if ast.get_docstring(node) is not None else None
                size = node.end_lineno - first + 1 - (doc.end_lineno - doc.lineno + 1 if doc else 0)
                if size > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({size})")
    assert not long, f"over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"


def test_server_and_shard_code_never_import_each_other():
    """strategies/ (the server's rules) and clients/ (the shard's training) meet only in the
    message contract (strategies/protocol.py), which imports neither side's rules."""
    for path in (ROOT / "clients").glob("*.py"):
        assert "strategies" not in _imported_modules(path), f"{path.relative_to(ROOT)} imports strategies"
    for path in (ROOT / "strategies").glob("*.py"):
        assert "clients" not in _imported_modules(path), f"{path.relative_to(ROOT)} imports clients"
    protocol = ROOT / "strategies" / "protocol.py"
    inner = {n.module for n in ast.walk(ast.parse(protocol.read_text())) if isinstance(n, ast.ImportFrom) and n.level}
    assert not inner, f"strategies/protocol.py imports {sorted(inner)} of strategies/"


def test_readme_layout_describes_this_house():
    """README's "Layout" lists every package folder, names only folders that exist, and states the
    import direction this file holds."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    listed = {line.split("/")[0] for line in block.splitlines() if line and not line.startswith(" ")}
    assert set(ALLOWED) <= listed, f"README Layout lacks {sorted(set(ALLOWED) - listed)}"
    assert all((ROOT / name).is_dir() for name in listed), f"README Layout names missing folders: {listed}"
    assert "`iet_agc -> fl_app -> strategies, clients, evaluation -> ddpm`" in readme
