"""Pure tensor maths on logits: every quantity in bits.

All functions take logits (unnormalised) over the last axis and work in float32
or better; ``p`` is the reference distribution (the model's final output) and
``q`` the lens's. The fused statistics of whole readouts (top-k, entropy, KL, ranks
in one pass per block) are :func:`lenskit.readout.logit_stats`.

Example:
    >>> import torch
    >>> from lenskit.metrics import entropy_bits
    >>> round(float(entropy_bits(torch.zeros(4))), 6)  # uniform over 4 tokens: 2 bits
    2.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = [
    "LN2",
    "LOG2E",
    "Reference",
    "cross_entropy_bits",
    "divergences",
    "entropy_bits",
    "js_bits",
    "kl_bits",
    "kl_nats",
    "log_probs",
    "rank_of",
    "total_variation",
]

LN2 = math.log(2.0)
LOG2E = 1.0 / LN2
"""``log2(e)``: nats times this are bits."""


def log_probs(logits: Float[Tensor, "*batch d_vocab"]) -> Float[Tensor, "*batch d_vocab"]:
    """Log-softmax in at least float32."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return torch.log_softmax(logits.to(dtype), dim=-1)


def entropy_bits(logits: Float[Tensor, "*batch d_vocab"]) -> Float[Tensor, "*batch"]:
    """Shannon entropy ``H(q) = -sum q log2 q``."""
    lq = log_probs(logits)
    return -(lq.exp() * lq).sum(-1) / LN2


def kl_bits(
    p_logits: Float[Tensor, "*batch d_vocab"], q_logits: Float[Tensor, "*batch d_vocab"]
) -> Float[Tensor, "*batch"]:
    """``KL(p || q) = sum p (log2 p - log2 q)``."""
    lp, lq = log_probs(p_logits), log_probs(q_logits)
    return (lp.exp() * (lp - lq)).sum(-1) / LN2


def js_bits(
    p_logits: Float[Tensor, "*batch d_vocab"], q_logits: Float[Tensor, "*batch d_vocab"]
) -> Float[Tensor, "*batch"]:
    """Jensen-Shannon divergence ``(KL(p||m) + KL(q||m)) / 2`` with ``m = (p + q) / 2``."""
    lp, lq = log_probs(p_logits), log_probs(q_logits)
    lm = torch.logaddexp(lp, lq) - LN2
    return 0.5 * ((lp.exp() * (lp - lm)).sum(-1) + (lq.exp() * (lq - lm)).sum(-1)) / LN2


def total_variation(
    p_logits: Float[Tensor, "*batch d_vocab"], q_logits: Float[Tensor, "*batch d_vocab"]
) -> Float[Tensor, "*batch"]:
    """Total variation distance ``sum |p - q| / 2`` (a probability, not bits)."""
    return 0.5 * (log_probs(p_logits).exp() - log_probs(q_logits).exp()).abs().sum(-1)


def divergences(
    p_logits: Float[Tensor, "*batch d_vocab"], q_logits: Float[Tensor, "*batch d_vocab"]
) -> tuple[Float[Tensor, "*batch"], Float[Tensor, "*batch"], Float[Tensor, "*batch"]]:
    """``KL(p||q)`` and Jensen-Shannon in bits, and total variation, from one softmax each.

    The same definitions as :func:`kl_bits`, :func:`js_bits` and :func:`total_variation`.
    """
    lp, lq = log_probs(p_logits), log_probs(q_logits)
    p, q = lp.exp(), lq.exp()
    lm = torch.logaddexp(lp, lq) - LN2
    kl = (p * (lp - lq)).sum(-1) / LN2
    js = 0.5 * ((p * (lp - lm)).sum(-1) + (q * (lq - lm)).sum(-1)) / LN2
    return kl, js, 0.5 * (p - q).abs().sum(-1)


def cross_entropy_bits(
    logits: Float[Tensor, "*batch d_vocab"], targets: Int[Tensor, "*batch"]
) -> Float[Tensor, "*batch"]:
    """``-log2 q(target)``."""
    return -log_probs(logits).gather(-1, targets.unsqueeze(-1)).squeeze(-1) / LN2


def rank_of(
    logits: Float[Tensor, "*batch d_vocab"], targets: Int[Tensor, "*batch"]
) -> Int[Tensor, "*batch"]:
    """Zero-based rank of each target: how many tokens have a strictly larger logit."""
    chosen = logits.gather(-1, targets.unsqueeze(-1))
    return (logits > chosen).sum(-1)


@dataclass(frozen=True)
class Reference:
    """The model's final distribution ``p`` at some positions, prepared once for many lenses.

    Attributes:
        probs: ``p``.
        neg_entropy: ``sum p log p`` in nats.
    """

    probs: Float[Tensor, "cell d_vocab"]
    neg_entropy: Float[Tensor, " cell"]

    @classmethod
    def from_logits(
        cls, logits: Float[Tensor, "cell d_vocab"], out: Tensor | None = None
    ) -> Reference:
        """Prepare ``p`` from the model's final logits (float32 or better).

        Outside autograd, a few rows at a time into ``p`` itself (see
        :func:`_softmax_and_neg_entropy`), or into ``out`` (a reused buffer shaped as
        the logits); with gradients, the plain definition.
        """
        z = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if torch.is_grad_enabled() and z.requires_grad:
            lp = log_probs(z)
            p = lp.exp()
            return cls(probs=p, neg_entropy=(p * lp).sum(-1))
        probs, neg_entropy = _softmax_and_neg_entropy(z, out)
        return cls(probs=probs, neg_entropy=neg_entropy)


_ROWS = 16  # rows per pass of _softmax_and_neg_entropy: 3 MB of float32 stay in cache


def _softmax_and_neg_entropy(z: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``softmax(z)`` and ``sum p log p`` (nats) per row, in base 2 and in place.

    With ``y = (z - max z) log2(e)`` and ``L = log2 sum 2^y``: ``p = 2^y / 2^L`` and
    ``sum p log p = (E_p[y] - L) ln 2``. Each pass writes a few rows of ``p`` or one
    reused buffer, so no [rows, d_vocab] temporary is made.
    """
    n = z.shape[0]
    if out is not None and out.shape != z.shape:
        raise ValueError(f"out is shaped {tuple(out.shape)}, the logits {tuple(z.shape)}")
    probs = torch.empty_like(z) if out is None else out
    neg_entropy = z.new_empty(n)
    work = z.new_empty(min(_ROWS, max(1, n)), z.shape[-1])
    for i in range(0, n, _ROWS):
        zc, pc = z[i : i + _ROWS], probs[i : i + _ROWS]
        y = work[: zc.shape[0]]
        torch.sub(zc, zc.amax(-1, keepdim=True), out=y).mul_(1.0 / LN2)
        torch.exp2(y, out=pc)
        total = pc.sum(-1, keepdim=True)
        pc.div_(total)
        neg_entropy[i : i + _ROWS] = (y.mul_(pc).sum(-1) - total.squeeze(-1).log2()) * LN2
    return probs, neg_entropy


def kl_nats(reference: Reference, logits: Float[Tensor, "cell d_vocab"]) -> Float[Tensor, " cell"]:
    """``KL(p || q)`` in nats for lens logits ``z``: ``sum p log p + lse(z) - E_p[z]``.

    Differentiable in ``logits``; its gradient is ``softmax(z) - p``.
    """
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    mean_p = (reference.probs * z).sum(-1)  # not einsum: see lenskit.readout.logit_stats
    return reference.neg_entropy + torch.logsumexp(z, dim=-1) - mean_p
