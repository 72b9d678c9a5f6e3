"""Causal basis extraction: the residual directions of a layer that matter most to a lens.

- :mod:`~lenskit.causal.extraction`: :func:`extract_causal_basis`, the greedy search.
- :mod:`~lenskit.causal.influence`: ablating a direction and measuring its influence.

Saved bases (:class:`~lenskit.lenses.basis.CausalBasis`) live with the lens that reads them.
"""

from lenskit.causal.extraction import CausalBasisConfig, extract_causal_basis
from lenskit.causal.influence import direction_tokens, lens_influence, model_influence

__all__ = [
    "CausalBasisConfig",
    "direction_tokens",
    "extract_causal_basis",
    "lens_influence",
    "model_influence",
]
