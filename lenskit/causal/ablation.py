"""Ablating a residual direction: the reference values and the ablation itself.

Ablating unit direction ``v`` at token ``t`` replaces the residual's coordinate along ``v``
with a reference value: ``h' = h - ((h - r) . v) v``, where ``r`` is the mean residual
(``mean`` ablation), zero (``zero``), or the residual of another token, drawn by a seeded
permutation without fixed points (``resample``).

Example:
    >>> import torch
    >>> from lenskit.causal.ablation import ablate
    >>> h, v = torch.tensor([[3.0, 4.0]]), torch.tensor([1.0, 0.0])
    >>> ablate(h, v, torch.zeros_like(h)).tolist()
    [[0.0, 4.0]]
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from lenskit.causal.config import ABLATIONS
from lenskit.errors import LenskitError

__all__ = ["ABLATIONS", "ROWS", "ablate", "ablation_reference"]

ROWS = 512  # rows per readout in the plain path


def ablation_reference(
    h: Float[Tensor, "cell d_model"], ablation: str, mean: Float[Tensor, " d_model"], *, seed: int
) -> Float[Tensor, "cell d_model"]:
    """The reference residual of each token for an ablation (see the module docs)."""
    if ablation == "mean":
        return mean.to(h).expand_as(h).clone()
    if ablation == "zero":
        return torch.zeros_like(h)
    if ablation == "resample":
        if h.shape[0] < 2:
            raise LenskitError("resample ablation needs at least two tokens: use more data")
        order = torch.randperm(h.shape[0], generator=torch.Generator().manual_seed(seed))
        source = torch.empty_like(order)
        source[order] = order.roll(-1)  # each token takes the next one's in a random cycle
        return h[source.to(h.device)].clone()
    raise LenskitError(f"unknown ablation {ablation!r}: use one of {', '.join(ABLATIONS)}")


def ablate(
    h: Float[Tensor, "*batch d_model"],
    v: Float[Tensor, " d_model"],
    reference: Float[Tensor, "*batch d_model"],
) -> Float[Tensor, "*batch d_model"]:
    """``h - ((h - reference) . v) v``: the coordinate along unit ``v`` set to the reference's."""
    coef = ((h - reference) * v).sum(-1, keepdim=True)
    return h - coef * v
