"""The public surface is exactly ``__all__``: modules are private, exports are deliberate."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import hapax
import hapax.access
import hapax.api
import hapax.config
import hapax.providers
import hapax.routing

PACKAGES = [hapax, hapax.access, hapax.api, hapax.config, hapax.providers, hapax.routing]
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_all_names_exist_and_nothing_else_is_public(package: object) -> None:
    all_names = set(package.__all__)  # type: ignore[attr-defined]
    for name in all_names:
        assert hasattr(package, name), f"{package.__name__}.__all__ names missing {name}"  # type: ignore[attr-defined]
    name = package.__name__  # type: ignore[attr-defined]
    # Every class or function the package defines (not one it merely imports) is exported.
    own = {
        n for n, v in vars(package).items()
        if not n.startswith("_") and getattr(v, "__module__", "").startswith(name + ".")
    }
    assert own - all_names == set()


def test_modules_are_private() -> None:
    for pkg in PACKAGES:
        for m in pkgutil.iter_modules(pkg.__path__):
            assert m.name.startswith("_") or m.ispkg, f"{pkg.__name__}.{m.name} should be private"
            importlib.import_module(f"{pkg.__name__}.{m.name}")


def private_imports(source: str) -> list[str]:
    """Each ``hapax`` module or name that ``source`` imports from behind a leading underscore."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # ``from hapax.access import _x`` reaches a private module (or name) just the same.
            mods = [f"{node.module}.{a.name}" for a in node.names if a.name != "__version__"]
        else:
            continue
        for mod in mods:
            parts = mod.split(".")
            if parts[0] == "hapax" and any(p.startswith("_") for p in parts[1:]):
                found.append(f"line {node.lineno}: {mod}")
    return found


def test_private_import_check_catches_each_form() -> None:
    assert private_imports("from hapax._errors import HapaxError") == ["line 1: hapax._errors.HapaxError"]
    assert private_imports("import hapax.access._keys") == ["line 1: hapax.access._keys"]
    assert private_imports("from hapax import _admin") == ["line 1: hapax._admin"]
    assert private_imports("from hapax.access import AccessControl\nfrom hapax import __version__") == []


def test_node_imports_only_exported_names() -> None:
    """The composition root uses the core through each package's ``__init__``, never its private modules."""
    offenders = {
        str(path.relative_to(ROOT)): hits
        for path in sorted((ROOT / "node").rglob("*.py"))
        if (hits := private_imports(path.read_text()))
    }
    assert offenders == {}
