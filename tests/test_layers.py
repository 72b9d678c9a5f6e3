"""The house rules on imports: each module imports only from the layers below it.

Layers, top to bottom (a module may import its own layer and any lower one):
the app, the command line, plotting and export, training, causal basis extraction,
evaluation, the one-prompt analyses (trajectory, comparison, attribution), the readout
engine, lenses, residual streams, models, and the foundations (settings and config
dataclasses among them, so the command line builds its flags without loading torch).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Higher number = higher layer. Keys are module names or package prefixes (longest wins).
LAYERS = {
    "lenskit_app": 100,
    "lenskit.cli": 90,
    "lenskit.commands": 90,
    "lenskit.export": 80,
    "lenskit.plotting": 80,
    "lenskit.training": 70,
    "lenskit.causal": 65,
    "lenskit.evaluation": 60,
    "lenskit.attribution": 55,
    "lenskit.attribution_config": 3,
    "lenskit.attribution_result": 50,
    "lenskit.comparison": 55,
    "lenskit.comparison_result": 50,
    "lenskit.trajectory": 54,
    "lenskit.trajectory_result": 50,
    "lenskit.readout": 40,
    "lenskit.lenses": 30,
    "lenskit.residual": 20,
    "lenskit.models": 15,
    "lenskit.adapter": 15,
    "lenskit.tiny": 10,
    "lenskit.cells": 5,
    "lenskit.metrics": 5,
    "lenskit.progress": 5,
    "lenskit.data": 5,
    "lenskit.corpora": 5,
    "lenskit.io": 2,
    "lenskit.typing": 1,
    "lenskit.settings": 1,
    "lenskit.lazy": 0,
    "lenskit.allocator": 0,
    "lenskit.errors": 0,
}
PACKAGE_ROOT = {"lenskit": 55}  # `import lenskit` / `from lenskit import x`: the public API


def _layer(module: str) -> int:
    best = max(
        (k for k in LAYERS if module == k or module.startswith(k + ".")), key=len, default=None
    )
    if best is None:
        if module in PACKAGE_ROOT:
            return PACKAGE_ROOT[module]
        raise KeyError(module)
    return LAYERS[best]


def _modules() -> list[tuple[str, Path]]:
    found = []
    for folder in ("lenskit", "lenskit_app"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found.append((".".join(parts), path))
    return found


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module != "lenskit":
                names.append(node.module)
                continue
            for alias in node.names:  # a submodule, or a name of the public API
                sub = ROOT / "lenskit" / alias.name
                submodule = sub.with_suffix(".py").is_file() or sub.is_dir()
                names.append(f"lenskit.{alias.name}" if submodule else "lenskit")
    return names


@pytest.mark.parametrize(("module", "path"), _modules(), ids=lambda v: str(v))
def test_imports_only_from_below(module, path):
    if module in ("lenskit", "lenskit_app"):
        return  # package roots re-export their public names
    mine = _layer(module)
    for name in _imports(path):
        if name.split(".")[0] not in ("lenskit", "lenskit_app"):
            continue
        if name == "lenskit" and mine >= PACKAGE_ROOT["lenskit"]:
            continue
        assert _layer(name) <= mine, f"{module} imports {name}, a higher layer"


@pytest.mark.parametrize(("module", "path"), _modules(), ids=lambda v: str(v))
def test_library_never_imports_streamlit_and_lenses_never_plotly(module, path):
    third = {name.split(".")[0] for name in _imports(path)}
    if module.startswith("lenskit.") or module == "lenskit":
        assert "streamlit" not in third, module
    if module.startswith("lenskit.lenses"):
        assert "plotly" not in third, module
