"""Every public entry point's module docstring carries a runnable example.

The examples themselves run as doctests (``--doctest-modules`` over ``lenskit/`` in the
pytest configuration); this test makes sure none of them goes missing.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import lenskit

ENTRY_POINTS = [
    "lenskit",
    "lenskit.trajectory",
    "lenskit.comparison",
    "lenskit.residual",
    "lenskit.models",
    "lenskit.metrics",
    "lenskit.export",
    "lenskit.plotting",
    "lenskit.lenses.base",
    "lenskit.evaluation.evaluator",
    "lenskit.evaluation.layer_kl",
    "lenskit.evaluation.chunks",
    "lenskit.training.config",
    "lenskit.training.closed_form",
    "lenskit.training.loop",
    "lenskit.training.jacobian",
    "lenskit.causal.config",
    "lenskit.causal.search",
    "lenskit.causal.extraction",
]


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_entry_point_docstring_has_an_example(name):
    module = importlib.import_module(name)
    doc = ast.get_docstring(ast.parse(Path(module.__file__).read_text(encoding="utf-8"))) or ""
    assert "Example:" in doc and ">>>" in doc, f"{name}: add an Example: section to its docstring"


def test_doctests_are_collected(pytestconfig):
    assert pytestconfig.getini("doctest_optionflags") is not None
    assert "lenskit" in pytestconfig.getini("testpaths")
    assert "--doctest-modules" in " ".join(pytestconfig.getini("addopts"))


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(lenskit.__path__, "lenskit.")]
    for name in names:
        importlib.import_module(name)
