"""Each package's ``__all__`` is sorted and every name in it resolves."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize("package", ["h3d", "h3client", "h3optim"])
def test_all_is_sorted_and_resolves(package: str) -> None:
    mod = importlib.import_module(package)
    names = list(mod.__all__)
    assert names == sorted(names, key=str.lower) or names == sorted(names), names
    for name in names:
        assert hasattr(mod, name), f"{package}.__all__ names {name!r}, which is missing"
