"""Each row's head: the tokens a rounded readout reads again exactly, and what it returns."""

from __future__ import annotations

from typing import NamedTuple

from jaxtyping import Float, Int
from torch import Tensor

from lenskit.readout.stats import top_k

__all__ = ["EXACT_HEAD", "REFERENCE_HEAD", "ReadLogits", "head_ids"]

EXACT_HEAD = 16
"""Tokens per row whose logits a rounded-output matmul has recomputed exactly in float32."""
REFERENCE_HEAD = 8
"""The reference's most likely tokens per row that a rounded readout computes exactly."""


class ReadLogits(NamedTuple):
    """What a readout returns: float32 logits, and each row's top-k candidates if known.

    Attributes:
        logits: The float32 logits.
        candidates: In a low precision on CPUs, each row's :data:`EXACT_HEAD` most
            likely tokens by the rounded logits, read exactly: the row's top-k for any
            ``k`` up to that, as far as the rounding of the tail allows (None in exact
            mode). Pass them to :func:`~lenskit.readout.logit_stats`.
    """

    logits: Float[Tensor, "*cell d_vocab"]
    candidates: Int[Tensor, "*cell head"] | None


def head_ids(
    scores: Float[Tensor, "*cell d_vocab"], candidates: Int[Tensor, "*cell cand"] | None = None
) -> Int[Tensor, "*cell head"]:
    """The :data:`REFERENCE_HEAD` most likely tokens of each row of probabilities or logits.

    Passed as ``exact=`` so that a low-precision readout is exact where that
    distribution (the reference ``p``, or the other lens of a divergence) is likely.
    ``candidates``: the rows' :attr:`ReadLogits.candidates`, if they were read so.
    """
    flat = scores.reshape(-1, scores.shape[-1])
    cand = None if candidates is None else candidates.reshape(flat.shape[0], -1)
    ids = top_k(flat, min(REFERENCE_HEAD, flat.shape[-1]), cand)[1]
    return ids.reshape(*scores.shape[:-1], ids.shape[-1])
