"""The public surface is exactly ``__all__``: modules are private, exports are deliberate."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import hapax
import hapax.providers


@pytest.mark.parametrize("package", [hapax, hapax.providers], ids=lambda p: p.__name__)
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
    for pkg in (hapax, hapax.providers):
        for m in pkgutil.iter_modules(pkg.__path__):
            assert m.name.startswith("_") or m.ispkg, f"{pkg.__name__}.{m.name} should be private"
            importlib.import_module(f"{pkg.__name__}.{m.name}")
