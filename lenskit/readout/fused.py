"""Statistics of a whole rounded logit block in one compiled pass, its head made exact after.

:func:`~lenskit.readout.logit_stats` reads a block of rounded (bf16) logits a 16-row chunk
at a time in about ten eager passes: a float32 copy, the exact head written over it, then
shift, scale, clamp, ``exp2``, products and sums. Here ``torch.compile`` (inductor) fuses
those passes into one kernel over the whole block (:func:`_block_sums`): it reads each
row's bf16 logits once for the maxima of groups of 128 tokens, once more for
``sum 2^y``, ``sum 2^y y``, ``E_p[y]`` and the rank counts. The rows' heads are then
found from the group maxima, read exactly, and the sums corrected: each head token's
rounded term is taken out and its exact term put in, which gives the statistics of the
block with the exact head written over it (up to float32 rounding of the sums).

The kernel is compiled once per process (a few seconds, longer the first time on a
machine, whose compiled code inductor keeps on disk), so it is used for large reads only
(at least :data:`FUSED_MIN_ROWS` rows, such as evaluation's), once compiled or where the
work is long enough to repay the compile (:func:`worth_compiling`). Where it cannot
compile (no C++ compiler) or ``LENSKIT_COMPILE=0``, the eager passes run instead, with
the same results.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lenskit.metrics import LN2, LOG2E, Reference
from lenskit.readout.stats import EXP2_FLOOR, RowStats

__all__ = [
    "COMPILE_ENV",
    "COMPILE_PAYS_S",
    "FUSED_MIN_ROWS",
    "GROUP",
    "fused_ready",
    "fused_stats",
    "worth_compiling",
]

COMPILE_ENV = "LENSKIT_COMPILE"
"""Set to ``0`` to keep every read on the eager passes (no ``torch.compile``)."""
FUSED_MIN_ROWS = 8192
"""Reads of at least this many rows may use the compiled pass (evaluation's batches do)."""
COMPILE_PAYS_S = 30.0
"""Work expected to take at least this long repays the compile (see :func:`worth_compiling`)."""
GROUP = 128
"""Tokens per group whose maximum the kernel keeps: the top-k search looks inside the best."""

_log = logging.getLogger(__name__)
_lock = threading.Lock()  # one compiled call at a time: dynamo's caches are per process
_state: dict[str, Any] = {}


def _block_sums(
    z: Tensor, p: Tensor | None, bar: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Group maxima, shift and sums of rounded logits ``z`` [group, cell, vocab].

    ``p`` [cell, vocab] is the reference at the cells (every group against it) and
    ``bar`` [group, cell, rank] the logits to count the larger ones of. With
    ``y = (z - shift) log2 e`` and ``shift`` the row's largest rounded logit, returns
    the maxima of each :data:`GROUP` tokens, ``shift``, ``sum 2^y``, ``sum 2^y y``,
    ``E_p[y]`` and the counts, as :func:`~lenskit.readout.logit_stats` defines them.
    """
    g, m, vocab = z.shape
    zf = z.float()
    gmax = zf.view(g, m, vocab // GROUP, GROUP).amax(-1)
    shift = gmax.amax(-1, keepdim=True)
    y = (zf - shift) * LOG2E
    e = torch.exp2(y.clamp(min=EXP2_FLOOR))
    p_y = None if p is None else (y * p).sum(-1)
    above = None if bar is None else (zf.unsqueeze(-2) > bar.unsqueeze(-1)).sum(-1)
    return gmax, shift.squeeze(-1), e.sum(-1), (e * y).sum(-1), p_y, above


def fused_ready(device: torch.device, vocab: int) -> bool:
    """Whether reads on ``device`` with this vocabulary can use the compiled pass."""
    if device.type != "cpu" or vocab % GROUP or os.environ.get(COMPILE_ENV, "1") == "0":
        return False
    return not _state.get("failed", False)


def worth_compiling(expected_seconds: float) -> bool:
    """Whether to compile for work expected to take this long: the kernel runs ~10% faster.

    True once it has compiled in this process, or for work of at least
    :data:`COMPILE_PAYS_S` seconds; the compile itself takes a few seconds (more the first
    time on a machine).
    """
    return bool(_state.get("ran")) or expected_seconds >= COMPILE_PAYS_S


def _kernel() -> Callable[..., Any]:
    if "kernel" not in _state:
        _state["kernel"] = torch.compile(_block_sums, dynamic=True)
    return _state["kernel"]


def block_sums(
    z: Tensor, p: Tensor | None, bar: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None] | None:
    """:func:`_block_sums`, compiled; None (and never again) where it cannot compile."""
    if _state.get("failed"):
        return None
    with _lock:
        try:
            out = _kernel()(z, p, bar)
            _state["ran"] = True
            return out
        except Exception as err:  # no C++ compiler, an unsupported platform, ...
            _state["failed"] = True
            first = (str(err).strip().splitlines() or [""])[0][:200]
            _log.warning(
                "lenskit: compiled statistics unavailable (%s: %s); using the eager passes "
                "(set LENSKIT_COMPILE=0 to skip the attempt)",
                type(err).__name__,
                first,
            )
            return None


HeadLogits = Callable[[Tensor], Tensor]
"""``token ids [cell, head] -> their exact float32 logits at those rows``."""


def fused_stats(
    z: Float[Tensor, "cell d_vocab"],
    reference: Reference | None,
    ids: Int[Tensor, "cell target"],
    head: Int[Tensor, "cell head"] | None,
    head_logits: HeadLogits,
    *,
    top_k: int,
    own: int,
    rank_columns: int = 0,
) -> RowStats | None:
    """Statistics of rounded logits ``z`` with each row's head exact (None: not compiled).

    The results of :func:`~lenskit.readout.logit_stats` with ``exact_head`` (each row's
    ``own`` most likely tokens by the rounded logits, and ``head``, read exactly), with
    the requested tokens ``ids`` read exactly as well.

    Args:
        z: Rounded logits; rows stacked group by group, each group at the reference's
            cells (row ``r`` against reference row ``r % cells``).
        reference: The model's distribution at the cells, or None (KL is NaN).
        ids: Token ids per row whose log-probability (and rank) to report.
        head: Token ids per row to read exactly besides the row's own head.
        head_logits: Exact logits of token ids at rows (see :data:`HeadLogits`).
        top_k: How many top tokens to keep (at most ``own``).
        own: How many of each row's most likely tokens to read exactly.
        rank_columns: Rank only the last ``rank_columns`` columns of ``ids``.
    """
    n, vocab = z.shape
    m = n if reference is None else reference.probs.shape[0]
    if m < 1 or n % m or top_k > own:
        raise ValueError(f"{n} rows do not cycle through {m} of p, or top_k > own")
    g = n // m
    # ranks count the tokens above a requested token's exact logit: read those first
    bar = head_logits(ids[:, ids.shape[1] - rank_columns :]) if rank_columns else None
    sums = block_sums(
        z.view(g, m, vocab),
        None if reference is None else reference.probs,
        None if bar is None else bar.reshape(g, m, rank_columns),
    )
    if sums is None:
        return None
    gmax, shift, total, q_y, p_y, above = (None if s is None else s.reshape(n, -1) for s in sums)
    # each row's own head: its `own` best tokens lie in its `own` best groups
    groups = gmax.topk(min(own, gmax.shape[-1]), dim=-1).indices  # [cell, own]
    inside = z.view(n, -1, GROUP).gather(1, groups.unsqueeze(-1).expand(-1, -1, GROUP))
    where = inside.view(n, -1).topk(own, dim=-1).indices  # [cell, own] in those groups
    mine = groups.gather(1, where // GROUP) * GROUP + where % GROUP
    exact_ids = torch.cat([mine, ids] if head is None else [mine, head.to(mine.device), ids], 1)
    exact = head_logits(exact_ids)
    chosen = exact[:, exact_ids.shape[1] - ids.shape[1] :]  # the requested tokens, exact
    # correct the sums at the exact tokens (each once: a token may be named twice)
    same = exact_ids.unsqueeze(-1) == exact_ids.unsqueeze(-2)
    keep = ~same.tril(-1).any(-1)
    z_r = z.gather(1, exact_ids).float()  # the same tokens' rounded logits
    y_r = (z_r - shift) * LOG2E
    y_e = (exact - shift) * LOG2E
    e_r, e_e = (torch.exp2(y.clamp(min=EXP2_FLOOR)) for y in (y_r, y_e))
    total = total.squeeze(-1) + torch.where(keep, e_e - e_r, 0.0).sum(-1)
    q_y = q_y.squeeze(-1) + torch.where(keep, e_e * y_e - e_r * y_r, 0.0).sum(-1)
    log2_total = total.log2()
    lse = shift.squeeze(-1) + log2_total * LN2
    if reference is None or p_y is None:
        kl = torch.full_like(lse, float("nan"))
    else:
        p_head = reference.probs.expand(g, m, vocab).gather(2, exact_ids.view(g, m, -1))
        p_y = p_y.squeeze(-1) + torch.where(keep, (y_e - y_r) * p_head.view(n, -1), 0.0).sum(-1)
        neg_entropy = reference.neg_entropy.repeat(g)
        kl = (neg_entropy / LN2 + log2_total - p_y).clamp_min(0.0)
    ranks = torch.full_like(ids, -1)
    if above is not None and bar is not None:
        over = bar.unsqueeze(-1)
        flips = (exact.unsqueeze(-2) > over).int() - (z_r.unsqueeze(-2) > over).int()
        ranks[:, ids.shape[1] - rank_columns :] = above + (flips * keep.unsqueeze(-2)).sum(-1)
    top_values, where = exact[:, :own].topk(top_k, dim=-1)
    return RowStats(
        mine.gather(1, where),
        (top_values - lse.unsqueeze(-1)).exp(),
        (log2_total - q_y / total).clamp_min(0.0),
        kl,
        chosen - lse.unsqueeze(-1),
        ranks,
    )
