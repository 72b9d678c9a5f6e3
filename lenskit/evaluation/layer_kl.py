"""Per-layer KL of lenses to the model's output: the lean, KL-only evaluation.

:func:`layer_kl_sums` runs token chunks through the model once per batch and lets every
lens read the same residuals; training uses it to score translators, and
:func:`layer_kl` turns it into a per-layer table; :func:`layer_kl_tokens` keeps every
token's value. :func:`lenskit.evaluation.evaluate`
is the full evaluation (cross-entropy, entropy, top-1 agreement, error bars).

Example:
    >>> import lenskit
    >>> from lenskit.data import Corpus, tokenize_corpus
    >>> from lenskit.evaluation import layer_kl
    >>> model = lenskit.load_model("tiny-llama")
    >>> chunks = tokenize_corpus(Corpus("demo", ("a b c " * 60,)), model.tokenizer, 32)
    >>> layer_kl(model, lenskit.get_lens("logit", model), chunks).columns.tolist()
    ['layer', 'kl_bits', 'covered']
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from lenskit.data import TokenChunks
from lenskit.errors import LenskitError
from lenskit.lenses.base import Lens, point_rows
from lenskit.metrics import LN2, Reference
from lenskit.progress import Progress, ProgressCallback
from lenskit.readout import MATMUL_ROWS, Readout
from lenskit.residual import capture, row_capture_points

__all__ = ["ROWS_PER_READOUT", "layer_kl", "layer_kl_sums", "layer_kl_tokens"]

ROWS_PER_READOUT = MATMUL_ROWS  # rows per unembedding matmul (lenskit.readout.MATMUL_ROWS)


def layer_kl_sums(
    model: Any,
    lenses: Sequence[Lens],
    tokens: Int[Tensor, "chunk pos"],
    *,
    batch_size: int = 4,
    progress: bool = False,
    precision: str | None = None,
    points: Sequence[str] = ("resid_pre",),
    on_progress: ProgressCallback | None = None,
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
        precision: The readout's matmul precision (see :mod:`lenskit.readout`).
        points: Residual points read in each block; ``("resid_pre", "resid_mid")``
            also scores the ``L12.mid`` rows (stream order: ``L0``, ``L0.mid``, ``L1``, ...).
        on_progress: Called with a :class:`~lenskit.progress.Progress` (phase ``"score"``,
            tokens done) after each batch.

    Returns:
        ``[len(lenses), rows]`` float64 sums (divide by ``tokens.numel()`` for means),
        NaN where a lens does not cover the row; rows are the block inputs (and
        ``resid_mid`` rows, if asked for), not the output.
    """
    sums = torch.zeros(len(lenses), _n_rows(model, lenses, points), dtype=torch.float64)
    for kl in _batches(model, lenses, tokens, batch_size, progress, precision, points, on_progress):
        sums += kl.double().sum(-1)
    if lenses:
        sums[~_covered(lenses, points)] = math.nan  # also where no batch ran
    return sums


def layer_kl_tokens(
    model: Any,
    lenses: Sequence[Lens],
    tokens: Int[Tensor, "chunk pos"],
    *,
    batch_size: int = 4,
    progress: bool = False,
    precision: str | None = None,
    points: Sequence[str] = ("resid_pre",),
    on_progress: ProgressCallback | None = None,
) -> Float[Tensor, "lens layer cell"]:
    """``KL(model output || lens)`` in nats of every token, per lens and block input.

    As :func:`layer_kl_sums` (whose sums these are, and whose arguments these are), but
    each token's value is kept: the cells are the tokens in ``tokens.flatten()`` order,
    float32, NaN where a lens does not cover the row.
    """
    parts = list(
        _batches(model, lenses, tokens, batch_size, progress, precision, points, on_progress)
    )
    if not parts:
        return torch.zeros(len(lenses), _n_rows(model, lenses, points), 0)
    return torch.cat(parts, -1)


def _n_rows(model: Any, lenses: Sequence[Lens], points: Sequence[str]) -> int:
    return len(point_rows(lenses, points)) - 1 if lenses else int(model.cfg.n_layers)


def _covered(lenses: Sequence[Lens], points: Sequence[str]) -> Tensor:
    """``[lens, row]``: whether each lens reads each row."""
    read = point_rows(lenses, points)[:-1] if lenses else []
    return torch.tensor(
        [[lens.covers_point(r.layer, r.point) for r in read] for lens in lenses], dtype=torch.bool
    ).view(len(lenses), len(read))


def _batches(
    model: Any,
    lenses: Sequence[Lens],
    tokens: Tensor,
    batch_size: int,
    progress: bool,
    precision: str | None,
    points: Sequence[str],
    on_progress: ProgressCallback | None,
) -> Iterator[Tensor]:
    """Per batch, ``[lens, row, token]`` KL (nats, float32; NaN where not covered)."""
    if batch_size < 1:
        raise LenskitError(f"batch_size must be >= 1, got {batch_size}: pass a positive size")
    if not lenses:
        return
    read = point_rows(lenses, points)[:-1]
    covered = [[lens.covers_point(r.layer, r.point) for r in read] for lens in lenses]
    starts = range(0, tokens.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="held-out KL", unit="batch", leave=False)
    device = lenses[0].adapter.W_U.device
    engine = Readout(lenses[0].adapter, precision)
    tic = time.perf_counter()
    with torch.no_grad():
        for start in starts:
            batch = tokens[start : start + batch_size].to(device)
            cap = capture(model, batch, points=row_capture_points(read))
            rows = cap.row_stack(read).flatten(1, 2)  # [row, n, d_model]
            reference = Reference.from_logits(cap.logits.flatten(0, 1))
            kl = torch.full((len(lenses), len(read), batch.numel()), math.nan)
            for i, lens in enumerate(lenses):
                for k, row in enumerate(read):
                    if covered[i][k]:
                        moved = lens.transform_point(rows[k], row.layer, row.point)
                        kl[i, k] = engine.kl_nats(moved, reference).float().cpu()
            yield kl
            if on_progress is not None:
                done, spent = (start + len(batch)) * tokens.shape[1], time.perf_counter() - tic
                on_progress(Progress("score", done, tokens.numel(), done / spent, spent))


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
