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
``covered`` False. ``points=("resid_pre", "resid_mid")`` also scores the stream between
attention and MLP (rows ``L12.mid``, after ``L12``; ``layer`` is then the row index).

Example:
    >>> import lenskit
    >>> from lenskit.data import Corpus
    >>> from lenskit.evaluation import evaluate
    >>> model = lenskit.load_model("tiny-llama")
    >>> text = Corpus("demo", ("the cat sat on the mat " * 40,))
    >>> result = evaluate(model, [lenskit.get_lens("logit", model)], text, tokens=64,
    ...                   seq_len=32, progress=False)
    >>> sorted(set(result.metrics.lens))
    ['logit', 'model']
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lenskit.data import Corpus, TokenChunks
from lenskit.errors import LenskitError
from lenskit.evaluation.chunks import eval_chunks
from lenskit.evaluation.estimate import expected_seconds
from lenskit.evaluation.results import (
    METRICS,
    ChunkMoments,
    EvalResult,
    metrics_frame,
    transfer_frame,
)
from lenskit.lenses.base import Lens, point_rows
from lenskit.lenses.tuned import TunedLens
from lenskit.metrics import LN2, Reference
from lenskit.models import ModelAdapter, Row
from lenskit.progress import Progress, ProgressCallback
from lenskit.readout import (
    MATMUL_ROWS,
    Readout,
    RowStats,
    head_ids,
    logit_stats,
    scratch_buffer,
)
from lenskit.readout.fused import worth_compiling
from lenskit.residual import capture, row_capture_points

__all__ = ["EvalResult", "eval_chunks", "evaluate", "expected_seconds"]


# Dtype of the statistics of the logits; logit_stats sums in float32 to ~1e-7 relative.
STATS_DTYPE = torch.float32


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


def _row_values(stats: RowStats, model_top: Int[Tensor, " cell"]) -> Float[Tensor, "4 *group cell"]:
    """Per position: KL, cross-entropy and entropy (bits), and top-1 agreement (0/1)."""
    agree = (stats.top_ids[..., 0] == model_top).to(stats.kl.dtype)
    ce = -stats.id_log_probs[..., 0] / LN2
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
    on_result: Callable[[EvalResult], None] | None = None,
    precision: str | None = None,
    points: Sequence[str] = ("resid_pre",),
) -> EvalResult:
    """Per-layer metrics of lenses over a corpus, with standard errors over chunks.

    Each batch of chunks runs through the model once; every lens reads the same block
    inputs. In each chunk of ``seq_len`` tokens, the first ``seq_len - 1`` positions are
    scored (the last has no next token in the chunk): ``KL(model output || lens)``, the
    cross-entropy of the actual next token, the lens's entropy (bits) and whether its
    top-1 is the model's top-1. The readout runs in the chosen precision
    (:mod:`lenskit.readout`), the statistics of its logits in float32
    (:data:`STATS_DTYPE`), summed per chunk in float64; ``p`` is the model's own output.
    Only per-chunk means are kept, so memory does not grow with ``tokens``. See
    :class:`~lenskit.evaluation.results.EvalResult` for the table.

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
            ``"evaluate"``) every second or so and after every batch (tokens counted
            within a batch as its readouts finish); if it raises, the evaluation stops.
        on_result: Called with the result of the chunks finished so far after every
            batch (for a Stop that keeps finished work: keep the last one).
        precision: The readout's matmul precision (see :mod:`lenskit.readout`).
        points: Residual points scored in each block: ``("resid_pre",)`` (block
            inputs) or ``("resid_pre", "resid_mid")`` (also the ``L12.mid`` rows; every
            lens must read them). ``transfer`` reads block inputs either way.

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
    lens_list = list(named.values())
    rows = point_rows(lens_list, points)
    chunks = eval_chunks(model, data, tokens=tokens, seq_len=seq_len, seed=seed, held_out=held_out)
    adapter = ModelAdapter(model)
    engine = Readout(adapter, precision)
    # the compiled statistics pass, where this evaluation is long enough to repay it
    compiled = worth_compiling(
        expected_seconds(model, lens_list, chunks.n_tokens, precision=precision, points=points)
    )
    seq_len = chunks.seq_len
    covered = [[lens.covers_point(r.layer, r.point) for r in rows[:-1]] for lens in lens_list]
    run = _Run(named, covered, tuned if transfer else [], adapter, chunks, seed, rows)
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
    last = [tic]

    def tick(done: float | int, force: bool = False) -> None:
        now = time.perf_counter()
        if on_progress is not None and (force or now - last[0] >= 1.0):
            last[0] = now
            spent = now - tic
            done_tokens = round(done)
            on_progress(Progress("evaluate", done_tokens, chunks.n_tokens, done / spent, spent))

    with torch.no_grad(), bar:
        for start in range(0, len(chunks), batch_size):
            batch = chunks.tokens[start : start + batch_size].to(adapter.W_U.device)
            first, size = start * seq_len, batch.numel()
            sums = _batch_sums(
                model,
                engine,
                [named[n] for n in run.tuned],
                lens_list,
                covered,
                batch,
                lambda f, first=first, size=size: tick(first + f * size),
                rows[:-1],
                compiled,
            )
            run.add(sums, len(batch))
            bar.update(batch.numel())
            tick((start + len(batch)) * seq_len, force=True)
            if on_result is not None:
                on_result(run.result(time.perf_counter() - tic))
    return run.result(time.perf_counter() - tic)


class _Run:
    """The running moments of an evaluation, and its result so far."""

    def __init__(
        self,
        named: dict[str, Lens],
        covered: list[list[bool]],
        tuned: list[str],
        adapter: ModelAdapter,
        chunks: TokenChunks,
        seed: int,
        rows: Sequence[Row],
    ) -> None:
        n_layers = adapter.n_layers
        self.named, self.covered, self.tuned, self.adapter = named, covered, tuned, adapter
        self.chunks, self.seed, self.done, self.labels = chunks, seed, 0, [r.label for r in rows]
        self.moments = ChunkMoments((len(named), len(rows) - 1, len(METRICS)))
        self.reference = ChunkMoments((2,))
        self.transfer = ChunkMoments((len(tuned), n_layers, n_layers)) if tuned else None

    def add(self, sums: dict[str, Tensor], n_chunks: int) -> None:
        """Merge one batch's per-chunk sums."""
        self.moments.add(sums["lens"])
        self.reference.add(sums["model"])
        if self.transfer is not None:
            self.transfer.add(sums["transfer"])
        self.done += n_chunks

    def result(self, seconds: float) -> EvalResult:
        """The result of the chunks finished so far."""
        named, adapter, chunks, seq_len = self.named, self.adapter, self.chunks, self.chunks.seq_len
        notes = {name: lens.note for name, lens in named.items() if lens.note}
        objectives = {name: lens.objective for name, lens in named.items()}
        frame = metrics_frame(
            {name: lens.kind for name, lens in named.items()},
            self.covered,
            self.labels,
            self.moments,
            self.reference,
            tokens_per_byte=chunks.n_tokens / chunks.n_bytes if chunks.n_bytes else math.nan,
            notes=notes,
            objectives=objectives,
        )
        table = None if self.transfer is None else transfer_frame(self.tuned, self.transfer)
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
            tokens=self.done * seq_len,
            scored_tokens=self.done * (seq_len - 1),
            chunks=self.done,
            seq_len=seq_len,
            n_bytes=round(chunks.n_bytes * self.done / len(chunks)),
            seed=self.seed,
            seconds=seconds,
            transfer=table,
            notes=notes,
        )


def _batch_sums(
    model: Any,
    engine: Readout,
    tuned: list[Lens],
    lenses: list[Lens],
    covered: list[list[bool]],
    batch: Int[Tensor, "chunk pos"],
    tick: Callable[[float], None],
    read: Sequence[Row],
    compiled: bool,
) -> dict[str, Tensor]:
    """Per-chunk means of one batch's scored positions; ``tick(fraction)`` as it goes.

    ``compiled``: whether the statistics may use the compiled pass (see
    :meth:`~lenskit.readout.Readout.read_stats`).

    Returns:
        ``lens`` [lens, layer, metric, chunk], ``model`` [2, chunk] (cross-entropy and
        entropy of the model's output) and ``transfer`` [tuned, translator, layer, chunk].
    """
    n_chunks, n_pos = batch.shape[0], batch.shape[1] - 1
    # p is read from the final residual (as every lens row is) in float32: the same
    # logits as the model's own, without a copy of a [chunk, pos, d_vocab] tensor
    cap = capture(model, batch, points=("resid_pre", *row_capture_points(read)), logits=False)

    def scored(h: Tensor) -> Tensor:  # [chunk, pos, d_model] -> [n, d_model], last pos dropped
        return h[:, :-1].reshape(-1, h.shape[-1])

    # one small [n, d_model] tensor per row, not a stacked copy of them all
    rows = [
        scored(cap.final if r.point == "resid_post" else cap.stack(r.point)[r.layer]) for r in read
    ]
    n_layers, device = cap.stack("resid_pre").shape[0], batch.device
    blocks_only = all(r.point == "resid_pre" for r in read)
    pre = rows if blocks_only or not tuned else [scored(h) for h in cap.stack("resid_pre")]
    final = scored(cap.final)  # [n, d_model]
    ids = batch[:, 1:].reshape(-1, 1)
    n_rows, d_model = final.shape
    owner = torch.arange(n_rows, device=device) // n_pos  # chunk of each row
    lens_sums = torch.zeros(
        len(lenses), len(read), len(METRICS), n_chunks, dtype=torch.float64, device=device
    )
    model_sums = torch.zeros(2, n_chunks, dtype=torch.float64, device=device)
    transfer_sums = torch.zeros(
        len(tuned), n_layers, n_layers, n_chunks, dtype=torch.float64, device=device
    )
    pairs = [(i, k) for i in range(len(lenses)) for k in range(len(read)) if covered[i][k]]
    for lo in range(0, n_rows, MATMUL_ROWS):
        part = slice(lo, lo + MATMUL_ROWS)
        n_part = final[part].shape[0]
        # the model's logits and p, and the lens rows below, go into buffers reused from
        # batch to batch: fresh 100 MB tensors cost page faults worth a third of a matmul
        own_logits = engine.reference_logits(final[part], scratch=5).to(STATS_DTYPE)
        reference = Reference.from_logits(
            own_logits, out=scratch_buffer(6, n_part, own_logits.shape[-1], STATS_DTYPE, device)
        )
        head = head_ids(reference.probs)
        own = logit_stats(own_logits, reference, ids[part], top_k=1)
        model_top = own.top_ids[:, 0]
        values = torch.stack([-own.id_log_probs[:, 0] / LN2, own.entropy]).double()
        model_sums.index_add_(1, owner[part], values)
        if pairs:
            # every lens at every row, read together: they share p at these positions
            moved = scratch_buffer(4, len(pairs) * n_part, d_model, rows[0].dtype, device)
            moved = moved.view(len(pairs), n_part, d_model)  # [pair, cell, d_model]
            for j, (i, k) in enumerate(pairs):
                moved[j] = lenses[i].transform_point(rows[k][part], read[k].layer, read[k].point)
            stats = engine.read_stats(
                moved,
                reference,
                ids[part],
                top_k=1,
                head=head,
                compiled=compiled,
                progress=lambda f, lo=lo, n=n_part: tick((lo + f * n) / n_rows),
            )
            values = _row_values(stats, model_top)  # [metric, pair, cell]
            for j, (i, k) in enumerate(pairs):
                lens_sums[i, k].index_add_(1, owner[part], values[:, j])
        tick(min(lo + MATMUL_ROWS, n_rows) / n_rows)
        for t, lens in enumerate(tuned):
            for src in range(n_layers):
                for layer in range(n_layers):
                    moved = lens.transform_hidden(pre[layer][part], src)
                    kl = engine.kl_nats(moved, reference).clamp_min(0.0) / LN2
                    transfer_sums[t, src, layer].index_add_(0, owner[part], kl.double())
    return {
        "lens": lens_sums / n_pos,
        "model": model_sums / n_pos,
        "transfer": transfer_sums / n_pos,
    }
