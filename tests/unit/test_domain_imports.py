"""The pure core imports only the standard library and itself."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

DOMAIN = Path(__file__).resolve().parents[2] / "service" / "domain"
MODULES = sorted(DOMAIN.glob("*.py"))


def imported_roots(path: Path) -> list[str]:
    """Return the dotted names a module imports (relative imports as '.')."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.append("." if node.level else node.module or "")
    return names


def allowed(name: str) -> bool:
    return (
        name == "."
        or name == "service.domain"
        or name.startswith("service.domain.")
        or name.split(".")[0] in sys.stdlib_module_names
    )


def test_domain_modules_exist() -> None:
    """The domain package holds the privacy and detection modules."""
    assert {"privacy.py", "detect.py"} <= {p.name for p in MODULES}


@pytest.mark.parametrize("path", MODULES, ids=[p.name for p in MODULES])
def test_domain_imports_only_stdlib_and_itself(path: Path) -> None:
    """Every module in service/domain imports only the standard library and service.domain."""
    bad = [n for n in imported_roots(path) if not allowed(n)]
    assert bad == [], f"{path.name} imports {bad}"


def test_checker_catches_a_third_party_import(tmp_path: Path) -> None:
    """The import check flags third-party and other service imports."""
    p = tmp_path / "m.py"
    p.write_text("import asyncpg\nfrom service import wire\nfrom . import privacy\nimport math\n")
    assert [n for n in imported_roots(p) if not allowed(n)] == ["asyncpg", "service"]
