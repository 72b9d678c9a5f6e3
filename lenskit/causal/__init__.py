"""Causal basis extraction: the residual directions of a layer that matter most to a lens.

- :mod:`~lenskit.causal.extraction`: :func:`extract_causal_basis`, the greedy search.
- :mod:`~lenskit.causal.influence`: ablating a direction and measuring its influence.

Saved bases (:class:`~lenskit.lenses.basis.CausalBasis`) live with the lens that reads them.
"""

import importlib
from typing import Any

# Public names load on first use: `from lenskit.x import Config` stays light.
_LAZY = {
    "CausalBasisConfig": "lenskit.causal.config",
    "direction_tokens": "lenskit.causal.influence",
    "extract_causal_basis": "lenskit.causal.extraction",
    "lens_influence": "lenskit.causal.influence",
    "model_influence": "lenskit.causal.influence",
}

__all__ = [
    "CausalBasisConfig",
    "direction_tokens",
    "extract_causal_basis",
    "lens_influence",
    "model_influence",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (keeps the command line's start light)."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
