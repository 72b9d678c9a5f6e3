"""Fused statistics of lens logits: top-k, entropy, KL, chosen-token log-probs and ranks.

:func:`logit_stats` takes a block of logits a cache-sized chunk of rows at a time, every
pass writing into the same two ``[chunk, d_vocab]`` buffers, all in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lenskit.metrics import LN2, LOG2E, Reference

__all__ = [
    "STATS_ROWS",
    "RowStats",
    "concat_stats",
    "kl_block",
    "logit_stats",
    "pair_divergences",
    "top_k",
]

STATS_ROWS = 16
"""Rows per statistics block: 16 x 49k float32 logits (3 MB) stay in the CPU cache."""
EXP2_FLOOR = -126.0
"""Exponents (base 2) are clamped here before ``exp2``: the smallest normal float32."""


ExactHead = Callable[[slice, Tensor], tuple[Tensor, Tensor, Tensor]]
"""``(rows, float32 copy of their rounded logits) -> (own top candidates, ids, exact logits)``."""


@dataclass(frozen=True)
class RowStats:
    """Statistics of a batch of lens distributions ``q`` against the model's final ``p``.

    Attributes:
        top_ids: The ``k`` most likely tokens, most likely first.
        top_probs: Their probabilities.
        entropy: ``H(q)`` in bits.
        kl: ``KL(p || q)`` in bits (NaN without a reference).
        id_log_probs: ``log q`` (nats) of the requested tokens.
        id_ranks: Zero-based ranks of the requested tokens (-1 where not ranked).
    """

    top_ids: Int[Tensor, "*cell k"]
    top_probs: Float[Tensor, "*cell k"]
    entropy: Float[Tensor, " *cell"]
    kl: Float[Tensor, " *cell"]
    id_log_probs: Float[Tensor, "*cell target"]
    id_ranks: Int[Tensor, "*cell target"]


def logit_stats(
    logits: Float[Tensor, "cell d_vocab"],
    reference: Reference | None,
    ids: Int[Tensor, "cell target"],
    *,
    top_k: int,
    rank_columns: int = 0,
    chunk: int = STATS_ROWS,
    candidates: Int[Tensor, "cell cand"] | None = None,
    exact_head: ExactHead | None = None,
) -> RowStats:
    """Top-k, entropy, KL to the model's output and chosen-token log-probs, in float32.

    In bits, with ``y = (z - max z) log2(e)`` for logits ``z`` and ``L = log2 sum 2^y``,
    uses ``H(q) = L - E_q[y]`` and ``KL(p||q) = sum p log2 p + L - E_p[y]``, so no
    log-softmax is materialised (``exp2`` is also several times faster than ``exp``).
    Rows are taken ``chunk`` at a time and every pass writes into the same two
    ``[chunk, d_vocab]`` buffers, so a block stays in the CPU cache and no pass
    allocates (fresh multi-megabyte tensors cost page faults on every operation).

    Args:
        logits: Lens logits, one row per cell: float32 (or better), or with ``patch`` a
            low-precision readout's rounded logits, read without a float32 copy.
        reference: The model's final distribution at the same cells, or at ``m`` cells
            that the rows go through again and again (row ``r`` against reference row
            ``r % m``: groups of rows stacked group by group, each at the same ``m``
            cells), or None (KL is NaN).
        ids: Token ids whose log-probability to report, per row.
        top_k: How many top tokens to keep.
        rank_columns: Rank only the last ``rank_columns`` columns of ``ids`` (a pass
            over the vocabulary each); the others get rank -1.
        chunk: Rows per block.
        candidates: Distinct token ids per row that hold its ``top_k`` most likely
            (a low-precision readout's :attr:`~lenskit.readout.ReadLogits.candidates`),
            so that the top-k compares those only; None (or fewer than ``top_k``): the
            whole row.
        exact_head: For rounded ``logits``: called with each chunk's rows and their
            float32 copy, returns the rows' own most likely tokens (their top-k
            candidates), and token ids with exact logits to write over the copy (a
            low-precision readout's exact head; see
            :meth:`lenskit.readout.Readout.read_stats`).

    Raises:
        ValueError: For a chunk below 1, or a reference whose rows do not divide the
            logits' rows.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    z = (
        logits
        if exact_head is not None
        else logits.to(torch.promote_types(logits.dtype, torch.float32))
    )
    n_ref = z.shape[0] if reference is None else reference.probs.shape[0]
    if n_ref != z.shape[0]:
        if n_ref < 1 or z.shape[0] % n_ref:
            raise ValueError(f"{z.shape[0]} rows of logits do not cycle through {n_ref} of p")
        chunk = math.gcd(chunk, n_ref)  # a chunk never straddles two passes over p
    dtype = torch.promote_types(z.dtype, torch.float32)
    n, vocab = z.shape[0], z.shape[-1]
    rows = min(chunk, max(1, n))
    work = _Work(
        zs=z.new_empty(rows, vocab, dtype=dtype),
        e=z.new_empty(rows, vocab, dtype=dtype),
        mask=torch.empty(rows, vocab, dtype=torch.bool, device=z.device),
    )
    # per-row sums, filled a chunk at a time; the formulas run once over all rows after
    sums = _Sums(
        top_values=z.new_empty(n, top_k, dtype=dtype),
        top_ids=ids.new_empty(n, top_k),
        shift=z.new_empty(n, 1, dtype=dtype),
        total=z.new_empty(n, dtype=dtype),
        q_y=z.new_empty(n, dtype=dtype),
        p_y=z.new_full((n,), math.nan, dtype=dtype),
        chosen=z.new_empty(ids.shape, dtype=dtype),
        ranks=torch.full_like(ids, -1),
    )
    for i in range(0, n, chunk):
        r = slice(i % n_ref, i % n_ref + chunk)
        _chunk_sums(
            z[i : i + chunk],
            None if reference is None else reference.probs[r],
            ids[i : i + chunk],
            None if candidates is None else candidates[i : i + chunk],
            None if exact_head is None else functools.partial(exact_head, slice(i, i + chunk)),
            rank_columns,
            work,
            sums.rows(slice(i, i + chunk)),
        )
    log2_total = sums.total.log2()
    lse = sums.shift.squeeze(-1) + log2_total * LN2
    if reference is None:
        kl = sums.p_y  # NaN
    else:
        neg_entropy = reference.neg_entropy.repeat(n // max(1, n_ref))
        kl = (neg_entropy / LN2 + log2_total - sums.p_y).clamp_min(0.0)
    return RowStats(
        sums.top_ids,
        (sums.top_values - lse.unsqueeze(-1)).exp(),
        (log2_total - sums.q_y / sums.total).clamp_min(0.0),
        kl,
        sums.chosen - lse.unsqueeze(-1),
        sums.ranks,
    )


@dataclass(frozen=True)
class _Work:
    """Reused ``[chunk, d_vocab]`` buffers: shifted logits (base 2), ``2^y``, a mask."""

    zs: Tensor
    e: Tensor
    mask: Tensor


@dataclass(frozen=True)
class _Sums:
    """Per-row results of the chunk passes (``y = (z - shift) log2 e``).

    ``total`` is ``sum 2^y``, ``q_y`` is ``sum 2^y y``, ``p_y`` is ``E_p[y]``, ``chosen``
    the chosen tokens' logits and ``top_values`` the top-k logits.
    """

    top_values: Tensor
    top_ids: Tensor
    shift: Tensor
    total: Tensor
    q_y: Tensor
    p_y: Tensor
    chosen: Tensor
    ranks: Tensor

    def rows(self, part: slice) -> _Sums:
        """The same sums of rows ``part``: views to write into."""
        return _Sums(*(getattr(self, f.name)[part] for f in dataclasses.fields(self)))


def top_k(
    z: Float[Tensor, "cell d_vocab"],
    k: int,
    candidates: Int[Tensor, "cell cand"] | None = None,
    *,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """``torch.topk(z, k)`` (values, indices) for float32 rows, in two cheap passes.

    The ``k`` largest entries lie in the ``k`` groups (of 128, 256 or 64 consecutive
    tokens) with the largest maxima: one max per group, then a top-k over those groups'
    entries only, instead of a selection over the whole vocabulary. With
    ``candidates`` (distinct token ids per row that hold its top ``k``, such as
    :attr:`~lenskit.readout.ReadLogits.candidates`; at least ``k`` of them), only those
    are compared. ``out``: tensors to write the values and indices into.
    """
    n, vocab = z.shape
    group = next((g for g in (128, 256, 64) if vocab % g == 0), 0)
    if candidates is None or candidates.shape[-1] < k:
        if not group or k * group * 4 > vocab:
            return torch.topk(z, k, dim=-1, out=out)
        maxima = z.view(n, vocab // group, group).amax(-1)
        groups = maxima.topk(k, dim=-1).indices.sort(-1).values  # ascending token order
        offsets = torch.arange(group, device=z.device)
        candidates = (groups.unsqueeze(-1) * group + offsets).view(n, k * group)
    values, where = z.gather(1, candidates).topk(k, dim=-1)
    if out is None:
        return values, candidates.gather(1, where)
    out[0].copy_(values)
    torch.gather(candidates, 1, where, out=out[1])
    return out


def _chunk_sums(
    z: Tensor,
    probs: Tensor | None,
    ids: Tensor,
    candidates: Tensor | None,
    exact_head: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]] | None,
    rank_columns: int,
    work: _Work,
    out: _Sums,
) -> None:
    """One chunk's passes over the vocabulary, written into ``out``'s rows."""
    n, k = z.shape[0], out.top_values.shape[-1]
    zs, e, mask = work.zs[:n], work.e[:n], work.mask[:n]
    if exact_head is None:
        top_k(z, k, candidates, out=(out.top_values, out.top_ids))
        out.shift.copy_(out.top_values[:, :1])
        torch.sub(z, out.shift, out=zs)  # log q up to a row constant, <= 0
        torch.gather(z, -1, ids, out=out.chosen)
        ranked, bar = z, out.chosen
    else:  # the rounded z read once, its exact head written over it
        # a copy, then in place: sub(bf16, float32) would make a float32 copy of its own
        own, head_ids, head_logits = exact_head(zs.copy_(z))
        torch.amax(head_logits, -1, keepdim=True, out=out.shift)
        zs.sub_(out.shift).scatter_(1, head_ids, head_logits - out.shift)
        top_k(zs, k, own, out=(out.top_values, out.top_ids))
        out.top_values.add_(out.shift)
        bar = zs.gather(-1, ids)  # shifted, as zs
        torch.add(bar, out.shift, out=out.chosen)
        ranked = zs
    for col in range(ids.shape[1] - rank_columns, ids.shape[1]):
        torch.gt(ranked, bar[:, col : col + 1], out=mask)
        out.ranks[:, col] = mask.sum(-1, dtype=torch.int32)  # no int64 copy of the mask
    # In base 2: exp2 is 2-4x faster than exp here, and sums in bits are what we report.
    zs.mul_(LOG2E)
    # 2^y below 2^-126 is subnormal, and subnormal results make exp2 several times
    # slower; clamped, such a token adds at most 2^-126 to a sum of at least 1.
    torch.exp2(torch.clamp(zs, min=EXP2_FLOOR, out=e), out=e)
    torch.sum(e, -1, out=out.total)
    # Elementwise product and sum, not einsum/bmm: on this BLAS those dot products
    # lose ~1e-4 relative accuracy over a 49k vocabulary; summation keeps ~1e-7.
    torch.sum(e.mul_(zs), -1, out=out.q_y)
    if probs is not None:
        torch.sum(zs.mul_(probs), -1, out=out.p_y)


def concat_stats(parts: list[RowStats]) -> RowStats:
    """The statistics of consecutive blocks of rows, as one."""
    names = [f.name for f in dataclasses.fields(RowStats)]
    return RowStats(*(torch.cat([getattr(p, n) for p in parts]) for n in names))


def kl_block(
    z: Float[Tensor, "cell d_vocab"],
    probs: Float[Tensor, "cell d_vocab"],
    neg_entropy: Float[Tensor, " cell"],
) -> Float[Tensor, " cell"]:
    """``KL(p || q)`` in nats of a block of lens logits ``z`` (``z`` is left unchanged)."""
    y = (z - z.amax(-1, keepdim=True)).mul_(LOG2E)  # base 2, as in logit_stats
    log2_total = torch.exp2(y).sum(-1).log2()
    return neg_entropy + (log2_total - y.mul_(probs).sum(-1)) * LN2


def pair_divergences(
    p_logits: Float[Tensor, "cell d_vocab"],
    q_logits: Float[Tensor, "cell d_vocab"],
    *,
    chunk: int = STATS_ROWS // 2,
) -> tuple[Float[Tensor, " cell"], Float[Tensor, " cell"], Float[Tensor, " cell"]]:
    """``KL(p||q)`` and Jensen-Shannon in bits, and total variation, of two lenses' logits.

    The definitions of :func:`lenskit.metrics.divergences`, in float32 and base 2 as in
    :func:`logit_stats`: ``chunk`` rows at a time through five reused buffers, with
    ``m = (p + q) / 2`` and ``JS = (sum p log2(p/m) + sum q log2(q/m)) / 2``.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    za = p_logits.to(torch.promote_types(p_logits.dtype, torch.float32))
    zb = q_logits.to(za.dtype)
    rows = min(chunk, max(1, za.shape[0]))
    work = [za.new_empty(rows, za.shape[-1]) for _ in range(5)]
    parts = [
        _pair_block(za[i : i + chunk], zb[i : i + chunk], work)
        for i in range(0, za.shape[0], chunk)
    ]
    if not parts:
        empty = za.new_zeros(0)
        return empty, empty.clone(), empty.clone()
    kl, js, tv = (torch.cat(field) for field in zip(*parts, strict=True))
    return kl, js, tv


def _log2_softmax(z: Tensor, log_q: Tensor, q: Tensor) -> None:
    """``log2 softmax(z)`` into ``log_q`` and ``softmax(z)`` into ``q``."""
    torch.sub(z, z.amax(-1, keepdim=True), out=log_q).mul_(LOG2E)
    torch.exp2(log_q, out=q)
    total = q.sum(-1, keepdim=True)
    q.div_(total)
    log_q.sub_(total.log2())


def _pair_block(za: Tensor, zb: Tensor, work: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    n = za.shape[0]
    lp, p, lq, q, t = (w[:n] for w in work)
    _log2_softmax(za, lp, p)
    _log2_softmax(zb, lq, q)
    kl = torch.sub(lp, lq, out=t).mul_(p).sum(-1)
    tv = torch.sub(p, q, out=t).abs_().sum(-1) * 0.5
    # log2 m; where p and q both underflow, any finite value (their terms are 0 * finite)
    lm = torch.add(p, q, out=t).clamp_min_(torch.finfo(t.dtype).tiny).log2_().sub_(1.0)
    js = (lp.sub_(lm).mul_(p).sum(-1) + lq.sub_(lm).mul_(q).sum(-1)) * 0.5
    return kl, js, tv
