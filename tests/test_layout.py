"""Imports run one way: fl_app -> strategies, clients, evaluation -> ddpm (the shared core)."""

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


@pytest.mark.parametrize("package", ["ddpm", "clients", "evaluation"])
def test_flower_stays_in_the_glue(package):
    """Flower is imported only by fl_app/ and strategies/: the method and the metric run without it."""
    for path in (ROOT / package).glob("*.py"):
        assert "flwr" not in _imported_modules(path), f"{path.relative_to(ROOT)} imports flwr"


def test_no_test_helpers_in_the_package():
    for package in [*ALLOWED, "deploy", "scripts", "examples"]:
        for path in (ROOT / package).glob("*.py"):
            assert "unittest" not in _imported_modules(path), f"{path.relative_to(ROOT)} imports unittest"
