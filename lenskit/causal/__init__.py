"""Causal basis extraction: the residual directions of a layer that matter most to a lens.

- :mod:`~lenskit.causal.extraction`: :func:`extract_causal_basis`, the greedy search.
- :mod:`~lenskit.causal.influence`: ablating a direction and measuring its influence.
- :mod:`~lenskit.causal.ablation`: the ablation itself and its reference values.
- :mod:`~lenskit.causal.objective`: the lens influence as a differentiable function.

Saved bases (:class:`~lenskit.lenses.basis.CausalBasis`) live with the lens that reads them.
"""

from lenskit.lazy import install

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

install(__name__, _LAZY)
