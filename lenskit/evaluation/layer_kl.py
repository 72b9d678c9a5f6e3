"""Per-layer KL of lenses to the model's output: the lean, KL-only evaluation.

:func:`layer_kl_sums` runs token chunks through the model once per batch and lets every
lens read the same residuals; training uses it to score translators, and
:func:`layer_kl` turns it into a per-layer table. :func:`lenskit.evaluation.evaluate`
is the full evaluation (cross-entropy, entropy, top-1 agreement, error bars).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from lenskit.data import TokenChunks
from lenskit.errors import LenskitError
from lenskit.lenses.base import Lens
from lenskit.metrics import LN2, Reference, kl_nats
from lenskit.residual import capture

__all__ = ["ROWS_PER_READOUT", "layer_kl", "layer_kl_sums"]

ROWS_PER_READOUT = 512  # rows per unembedding matmul: near peak speed, memory stays flat


def layer_kl_sums(
    model: Any,
    lenses: Sequence[Lens],
    tokens: Int[Tensor, "chunk pos"],
    *,
    batch_size: int = 4,
    progress: bool = False,
) -> Float[Tensor, "lens layer"]:
    """Summed ``KL(model output || lens)`` in nats per lens and block input, over all tokens.

    Each batch of chunks runs through the model once; every lens reads the same residuals.
    Block inputs a lens does not cover are skipped and NaN.

    Args:
        model: A ``TransformerBridge``.
        lenses: Lenses built for ``model``.
        tokens: Token chunks, one per row.
        batch_size: Chunks per forward pass.
        progress: Show a tqdm bar.

    Returns:
        ``[len(lenses), n_layers]`` float64 sums (divide by ``tokens.numel()`` for means),
        NaN where a lens does not cover the layer.
    """
    if batch_size < 1:
        raise LenskitError(f"batch_size must be >= 1, got {batch_size}: pass a positive size")
    n_layers = int(model.cfg.n_layers)
    sums = torch.zeros(len(lenses), n_layers, dtype=torch.float64)
    covered = [[lens.covers(layer) for layer in range(n_layers)] for lens in lenses]
    starts = range(0, tokens.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="held-out KL", unit="batch", leave=False)
    device = lenses[0].adapter.W_U.device if lenses else "cpu"
    with torch.no_grad():
        for start in starts:
            batch = tokens[start : start + batch_size].to(device)
            cap = capture(model, batch)
            rows = cap.stack("resid_pre").flatten(1, 2)  # [layer, n, d_model]
            reference = Reference.from_logits(cap.logits.flatten(0, 1))
            for lo in range(0, rows.shape[1], ROWS_PER_READOUT):
                part = Reference(
                    reference.probs[lo : lo + ROWS_PER_READOUT],
                    reference.neg_entropy[lo : lo + ROWS_PER_READOUT],
                )
                for i, lens in enumerate(lenses):
                    for layer in range(n_layers):
                        if covered[i][layer]:
                            logits = lens(rows[layer, lo : lo + ROWS_PER_READOUT], layer)
                            sums[i, layer] += kl_nats(part, logits).double().sum().cpu()
    sums[~torch.tensor(covered, dtype=torch.bool).view(len(lenses), n_layers)] = math.nan
    return sums


def layer_kl(
    model: Any,
    lens: Lens,
    chunks: TokenChunks,
    *,
    batch_size: int = 4,
    progress: bool = False,
) -> pd.DataFrame:
    """Mean ``KL(model output || lens)`` in bits at each block input, over held-out chunks.

    Args:
        model: A ``TransformerBridge``.
        lens: A lens built for ``model``.
        chunks: Held-out token chunks (see :func:`lenskit.data.tokenize_corpus`).
        batch_size: Chunks per forward pass.
        progress: Show a tqdm bar.

    Returns:
        One row per block input: columns ``layer``, ``kl_bits`` (NaN where the lens does
        not cover the layer) and ``covered``.
    """
    sums = layer_kl_sums(model, [lens], chunks.tokens, batch_size=batch_size, progress=progress)
    means = (sums[0] / chunks.n_tokens / LN2).tolist()
    frame = pd.DataFrame(
        {
            "layer": list(range(len(means))),
            "kl_bits": means,
            "covered": [lens.covers(layer) for layer in range(len(means))],
        }
    )
    frame.attrs.update(
        model=lens.adapter.name, lens=lens.kind, source=chunks.source, tokens=chunks.n_tokens
    )
    return frame
