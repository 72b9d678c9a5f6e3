"""Evaluating lenses over a corpus: per-layer KL, cross-entropy, entropy and top-1 agreement.

:func:`evaluate` streams a corpus through the model in batches of chunks; each batch runs
the model once and every lens reads the same residuals. Only per-chunk means are kept
(merged into running moments, see :mod:`lenskit.evaluation.results`), so memory stays flat
as the token count grows. :mod:`lenskit.evaluation.layer_kl` is the lean KL-only version
that training uses.

Every lens is scored against the model's output, whatever it was fitted for: the
``objective`` column says which lenses were trained to match that output (the tuned lens)
and which were not (the logit lens has no parameters; the J-lens averages Jacobians).
Rows a lens does not cover (the J-lens's ``L0``) are skipped and reported as NaN with
``covered`` False.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lenskit.data import Corpus, TokenChunks
from lenskit.errors import LenskitError
from lenskit.evaluation.chunks import eval_chunks
from lenskit.evaluation.layer_kl import ROWS_PER_READOUT
from lenskit.evaluation.results import (
    METRICS,
    ChunkMoments,
    EvalResult,
    metrics_frame,
    transfer_frame,
)
from lenskit.lenses.base import Lens
from lenskit.lenses.tuned import TunedLens
from lenskit.metrics import LN2, Reference, kl_nats, row_stats
from lenskit.models import ModelAdapter
from lenskit.progress import Progress, ProgressCallback
from lenskit.residual import capture

__all__ = ["OBJECTIVES", "EvalResult", "eval_chunks", "evaluate", "lens_objective"]


# Dtype of the statistics of the logits; row_stats sums in float32 to ~1e-7 relative.
STATS_DTYPE = torch.float32
_KIND_NOTES = {
    "jacobian": "J-lens: an average Jacobian, fitted without a KL objective (not trained to "
    "minimise KL to the model's output); layers without a fitted matrix are NaN",
}
OBJECTIVES = {
    "logit": "none",  # no parameters: the model's own final norm and unembedding
    "tuned": "kl_to_output",  # trained to minimise KL to the model's output
    "jacobian": "average_jacobian",  # fitted as a mean Jacobian, not to match the output
}
"""What each built-in lens kind was fitted for (the ``objective`` column). Other kinds
name theirs with a class attribute ``objective``; without one it is ``"unspecified"``."""


def lens_objective(lens: Lens) -> str:
    """What ``lens`` was fitted for: its class's ``objective``, or :data:`OBJECTIVES`."""
    declared = getattr(type(lens), "objective", None)
    if isinstance(declared, str) and declared:
        return declared
    return OBJECTIVES.get(lens.kind, "unspecified")


def _named_lenses(
    model: Any, lenses: Mapping[str, Lens] | Sequence[Lens] | Lens
) -> dict[str, Lens]:
    """Lenses by name (their kind for a sequence), checked to be distinct and for ``model``."""
    if isinstance(lenses, Lens):
        lenses = [lenses]
    pairs = (
        list(lenses.items())
        if isinstance(lenses, Mapping)
        else [(getattr(lens, "kind", ""), lens) for lens in lenses]
    )
    if not pairs:
        raise LenskitError("no lenses to evaluate: pass at least one, e.g. [get_lens('logit', m)]")
    named: dict[str, Lens] = {}
    for name, lens in pairs:
        if not isinstance(lens, Lens):
            raise LenskitError(
                f"lens {name!r} is a {type(lens).__name__}, not a Lens: build it "
                "with get_lens(kind, model)"
            )
        if not isinstance(name, str) or not name.strip() or name == "model":
            raise LenskitError(
                f"bad lens name {name!r}: use a non-empty name other than 'model' "
                "(the reference row)"
            )
        if name in named:
            raise LenskitError(
                f"duplicate lens name {name!r}: give each lens its own name, "
                "e.g. a mapping {'tuned-a': lens_a, 'tuned-b': lens_b}"
            )
        if lens.adapter.model is not model:
            raise LenskitError(
                f"lens {name!r} was built for another model object: build it with "
                "get_lens(kind, model) for this model"
            )
        named[name] = lens
    return named


def _row_values(
    logits: Float[Tensor, "n d_vocab"],
    reference: Reference,
    ids: Int[Tensor, "n 1"],
    model_top: Int[Tensor, " n"],
) -> Float[Tensor, "4 n"]:
    """Per position: KL, cross-entropy and entropy (bits), and top-1 agreement (0/1)."""
    stats = row_stats(logits, reference, ids, top_k=1)
    agree = (stats.top_ids[:, 0] == model_top).to(stats.kl.dtype)
    ce = -stats.id_log_probs[:, 0] / LN2
    return torch.stack([stats.kl, ce, stats.entropy, agree]).double()


def evaluate(
    model: Any,
    lenses: Mapping[str, Lens] | Sequence[Lens] | Lens,
    data: Corpus | TokenChunks | str | None,
    *,
    tokens: int,
    seq_len: int | None = None,
    batch_size: int = 4,
    seed: int = 0,
    transfer: bool = False,
    held_out: float | None = None,
    progress: bool = True,
    on_progress: ProgressCallback | None = None,
) -> EvalResult:
    """Per-layer metrics of lenses over a corpus, with standard errors over chunks.

    Each batch of chunks runs through the model once; every lens reads the same block
    inputs. In each chunk of ``seq_len`` tokens, the first ``seq_len - 1`` positions are
    scored (the last has no next token in the chunk): ``KL(model output || lens)``, the
    cross-entropy of the actual next token, the lens's entropy (bits) and whether its
    top-1 is the model's top-1. The readout runs in the model's dtype, the statistics of
    its logits in float32 (:data:`STATS_DTYPE`), summed per chunk in float64. Only
    per-chunk means are kept, so memory does not grow
    with ``tokens``. See :class:`~lenskit.evaluation.results.EvalResult` for the table.

    Args:
        model: A ``TransformerBridge``.
        lenses: Lenses by name, or a sequence or one lens (named by kind, which must then
            be distinct).
        data: Text or chunks (see :func:`eval_chunks`); ``None``: Shakespeare.
        tokens: Tokens to read, rounded down to whole chunks.
        seq_len: Tokens per chunk (default 256; given chunks keep theirs).
        batch_size: Chunks per forward pass.
        seed: Seed of the document order (for chunks: which ones are drawn).
        transfer: Also score every tuned lens's translator ``i`` on every layer ``j``
            (``n_layers**2`` readouts per batch instead of ``n_layers``).
        held_out: Evaluate only the held-out documents of ``split_documents(corpus,
            held_out, seed=seed)``, the split ``lenskit train`` holds out.
        progress: Show a tqdm bar with tokens per second.
        on_progress: Called with a :class:`~lenskit.progress.Progress` (phase
            ``"evaluate"``) after every batch; if it raises, the evaluation stops.

    Returns:
        The :class:`~lenskit.evaluation.results.EvalResult`.

    Raises:
        LenskitError: For bad lenses (duplicate names, another model), bad data or arguments.
    """
    named = _named_lenses(model, lenses)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LenskitError(f"batch_size must be a positive integer, got {batch_size!r}")
    tuned = [name for name, lens in named.items() if isinstance(lens, TunedLens)]
    if transfer and not tuned:
        raise LenskitError("transfer needs a tuned lens: add one (e.g. tuned:DIR) or drop it")
    chunks = eval_chunks(model, data, tokens=tokens, seq_len=seq_len, seed=seed, held_out=held_out)
    adapter = ModelAdapter(model)
    n_layers, seq_len = adapter.n_layers, chunks.seq_len
    lens_list = list(named.values())
    covered = [[lens.covers(layer) for layer in range(n_layers)] for lens in lens_list]
    moments = ChunkMoments((len(lens_list), n_layers, len(METRICS)))
    reference_moments = ChunkMoments((2,))
    transfer_moments = ChunkMoments((len(tuned), n_layers, n_layers)) if transfer else None
    from tqdm.auto import tqdm

    tic = time.perf_counter()
    bar = tqdm(
        total=chunks.n_tokens,
        desc="evaluating lenses",
        unit="tok",
        unit_scale=True,
        disable=not progress,
        dynamic_ncols=True,
    )
    with torch.no_grad(), bar:
        for start in range(0, len(chunks), batch_size):
            batch = chunks.tokens[start : start + batch_size].to(adapter.W_U.device)
            sums = _batch_sums(
                model, [named[n] for n in tuned] if transfer else [], lens_list, covered, batch
            )
            moments.add(sums["lens"])
            reference_moments.add(sums["model"])
            if transfer_moments is not None:
                transfer_moments.add(sums["transfer"])
            bar.update(batch.numel())
            if on_progress is not None:
                done, spent = (start + len(batch)) * seq_len, time.perf_counter() - tic
                on_progress(Progress("evaluate", done, chunks.n_tokens, done / spent, spent))
    seconds = time.perf_counter() - tic
    notes = {
        name: _KIND_NOTES[lens.kind] for name, lens in named.items() if lens.kind in _KIND_NOTES
    }
    objectives = {name: lens_objective(lens) for name, lens in named.items()}
    frame = metrics_frame(
        {name: lens.kind for name, lens in named.items()},
        covered,
        [adapter.row_label(row) for row in range(adapter.n_rows)],
        moments,
        reference_moments,
        tokens_per_byte=chunks.n_tokens / chunks.n_bytes if chunks.n_bytes else math.nan,
        notes=notes,
        objectives=objectives,
    )
    table = None if transfer_moments is None else transfer_frame(tuned, transfer_moments)
    return EvalResult(
        metrics=frame,
        model=adapter.name,
        lenses={
            name: {
                "kind": lens.kind,
                "source": getattr(lens, "source", None),
                "objective": objectives[name],
            }
            for name, lens in named.items()
        },
        source=chunks.source,
        tokens=chunks.n_tokens,
        scored_tokens=len(chunks) * (seq_len - 1),
        chunks=len(chunks),
        seq_len=seq_len,
        n_bytes=chunks.n_bytes,
        seed=seed,
        seconds=seconds,
        transfer=table,
        notes=notes,
    )


def _batch_sums(
    model: Any,
    tuned: list[Lens],
    lenses: list[Lens],
    covered: list[list[bool]],
    batch: Int[Tensor, "chunk pos"],
) -> dict[str, Tensor]:
    """Per-chunk means of one batch's scored positions.

    Returns:
        ``lens`` [lens, layer, metric, chunk], ``model`` [2, chunk] (cross-entropy and
        entropy of the model's output) and ``transfer`` [tuned, translator, layer, chunk].
    """
    n_chunks, n_pos = batch.shape[0], batch.shape[1] - 1
    cap = capture(model, batch)
    rows = cap.stack("resid_pre")[:, :, :-1].flatten(1, 2)  # [layer, n, d_model]
    n_layers, device = rows.shape[0], rows.device
    final = cap.logits[:, :-1].flatten(0, 1)
    ids = batch[:, 1:].reshape(-1, 1)
    owner = torch.arange(rows.shape[1], device=device) // n_pos  # chunk of each row
    lens_sums = torch.zeros(
        len(lenses), n_layers, len(METRICS), n_chunks, dtype=torch.float64, device=device
    )
    model_sums = torch.zeros(2, n_chunks, dtype=torch.float64, device=device)
    transfer_sums = torch.zeros(
        len(tuned), n_layers, n_layers, n_chunks, dtype=torch.float64, device=device
    )
    for lo in range(0, rows.shape[1], ROWS_PER_READOUT):
        part = slice(lo, lo + ROWS_PER_READOUT)
        own_logits = final[part].to(STATS_DTYPE)
        reference = Reference.from_logits(own_logits)
        own = row_stats(own_logits, reference, ids[part], top_k=1)
        model_top = own.top_ids[:, 0]
        values = torch.stack([-own.id_log_probs[:, 0] / LN2, own.entropy]).double()
        model_sums.index_add_(1, owner[part], values)
        for i, lens in enumerate(lenses):
            for layer in range(n_layers):
                if covered[i][layer]:
                    logits = lens(rows[layer, part], layer).to(STATS_DTYPE)
                    values = _row_values(logits, reference, ids[part], model_top)
                    lens_sums[i, layer].index_add_(1, owner[part], values)
        for t, lens in enumerate(tuned):
            for src in range(n_layers):
                for layer in range(n_layers):
                    moved = lens.transform_hidden(rows[layer, part], src)
                    logits = lens.adapter.readout(moved).to(STATS_DTYPE)
                    kl = kl_nats(reference, logits).clamp_min(0.0) / LN2
                    transfer_sums[t, src, layer].index_add_(0, owner[part], kl.double())
    return {
        "lens": lens_sums / n_pos,
        "model": model_sums / n_pos,
        "transfer": transfer_sums / n_pos,
    }
