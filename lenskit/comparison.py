"""How far two lenses disagree, cell by cell, over one prompt.

:func:`lens_divergence` reads every lens row of a prompt through two lenses and
compares their *full* next-token distributions at each (layer, position) cell:
``KL(a || b)`` and Jensen-Shannon in bits, total variation as a probability.
Rows are numbered as in :class:`lenskit.trajectory.Trajectory`: the block inputs,
then the model's final residual (labelled ``output``); ``points=("resid_pre",
"resid_mid")`` adds the stream between attention and MLP (``L12.mid``) in each block.

Example:
    >>> import lenskit
    >>> from lenskit.comparison import compare
    >>> model = lenskit.load_model("tiny-llama")
    >>> from lenskit.lenses.tuned import TunedLens
    >>> lenses = [lenskit.get_lens("logit", model), TunedLens.untrained(model)]
    >>> result = compare(model, lenses, "a b c d")
    >>> len(result.trajectories)
    2
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lenskit.cells import Cells
from lenskit.comparison_result import MEASURES, Comparison, LensDivergence
from lenskit.errors import LenskitError
from lenskit.lenses.base import Lens, point_rows, row_blocks
from lenskit.metrics import Reference
from lenskit.models import Row
from lenskit.readout import MATMUL_ROWS, ReadLogits, Readout, head_ids, pair_divergences, top_k
from lenskit.residual import token_texts
from lenskit.trajectory import (
    TrajectoryBuilder,
    position_blocks,
    prompt_tokens,
    resolve_target,
    row_residuals,
)

__all__ = ["MEASURES", "Comparison", "LensDivergence", "compare", "lens_divergence"]


class _DivergenceCells:
    """Per-cell divergence arrays of two lenses, filled row by row."""

    def __init__(
        self,
        lens_a: Lens,
        lens_b: Lens,
        n_pos: int,
        cells: Cells | None = None,
        rows: Sequence[Row] | None = None,
    ) -> None:
        self.row_list = list(rows) if rows is not None else lens_a.adapter.rows()
        n_rows = len(self.row_list)
        self.lens_a, self.lens_b = lens_a, lens_b
        self.cells = cells or Cells.select(n_rows, n_pos)
        self.covered = torch.tensor(
            [
                lens_a.covers_point(r.layer, r.point) and lens_b.covers_point(r.layer, r.point)
                for r in self.row_list
            ]
        )
        self.kl = torch.full((n_rows, n_pos), math.nan)
        self.js, self.tv = self.kl.clone(), self.kl.clone()
        self.top_a = torch.full((n_rows, n_pos), -1, dtype=torch.long)
        self.top_b = self.top_a.clone()

    def rows(self) -> list[int]:
        """Chosen rows that both lenses read."""
        return [r for r in self.cells.rows if self.covered[r]]

    def add(
        self,
        row: int,
        logits_a: ReadLogits,
        logits_b: ReadLogits,
        window: slice,
    ) -> None:
        """Divergences of one row from both lenses' readouts at positions ``window``."""
        (logits_a, cand_a), (logits_b, cand_b) = logits_a, logits_b
        kl_ab, js_ab, tv_ab = pair_divergences(logits_a, logits_b)
        self.kl[row, window] = kl_ab.clamp_min(0.0).cpu()
        self.js[row, window] = js_ab.clamp_min(0.0).cpu()
        self.tv[row, window] = tv_ab.cpu()
        self.top_a[row, window] = top_k(logits_a, 1, cand_a)[1][:, 0].cpu()  # a fast argmax
        self.top_b[row, window] = top_k(logits_b, 1, cand_b)[1][:, 0].cpu()

    def finish(self, model: Any, tokens: Tensor, prompt: str | Tensor) -> LensDivergence:
        adapter, n_pos = self.lens_a.adapter, tokens.shape[-1]

        def grid(ids: Tensor) -> tuple[tuple[str, ...], ...]:
            return tuple(tuple(row) for row in token_texts(model.tokenizer, ids))

        return LensDivergence(
            model_name=adapter.name,
            lens_a=self.lens_a.kind,
            lens_b=self.lens_b.kind,
            prompt=prompt if isinstance(prompt, str) else f"<{n_pos} token ids>",
            token_ids=tokens[0].cpu(),
            tokens=tuple(token_texts(model.tokenizer, tokens[0])),
            layer_labels=tuple(r.label for r in self.row_list),
            covered=self.covered,
            kl=self.kl,
            js=self.js,
            tv=self.tv,
            top1_a=grid(self.top_a),
            top1_b=grid(self.top_b),
            cells=self.cells,
        )


def _check_model(model: Any, lenses: Sequence[Lens]) -> None:
    for lens in lenses:
        lens.check_model(model)


def lens_divergence(
    model: Any,
    lens_a: Lens,
    lens_b: Lens,
    prompt: str | Tensor,
    *,
    rows: Sequence[int] | None = None,
    positions: tuple[int, int] | None = None,
    progress: Callable[[int, int], None] | None = None,
    precision: str | None = None,
    points: Sequence[str] = ("resid_pre",),
) -> LensDivergence:
    """Compare two lenses' full next-token distributions at every row and position.

    The model runs once; the covered rows are then read through both lenses a block
    of cells at a time (:class:`lenskit.readout.Readout`).

    Args:
        model: A ``TransformerBridge``.
        lens_a: The first lens (``p`` in ``KL(p || q)``), built for ``model``.
        lens_b: The second lens, built for ``model``.
        prompt: Text (tokenized with the model's BOS token) or integer token ids.
        rows: Compute only these rows (None: all); the others are NaN.
        positions: Compute only positions ``start..stop-1`` (None: all).
        progress: Called as ``progress(done, total)`` after each row (of each block of
            positions), for a progress bar.
        precision: The readout's matmul precision (see :mod:`lenskit.readout`).
        points: Residual points read in each block (``("resid_pre", "resid_mid")``
            adds the ``L12.mid`` rows; both lenses must read them).

    Returns:
        The :class:`LensDivergence`.

    Raises:
        LenskitError: If a lens was built for another model, the prompt is bad, or a
            lens has no map for the sub-layer rows asked for.
    """
    _check_model(model, (lens_a, lens_b))
    row_list = point_rows([lens_a, lens_b], points)
    engine = Readout(lens_a.adapter, precision)
    tokens = prompt_tokens(model, prompt)
    chosen = Cells.select(len(row_list), tokens.shape[-1], rows, positions)
    hidden = row_residuals(model, tokens, row_list)  # [layer, pos, d_model]
    cells = _DivergenceCells(lens_a, lens_b, tokens.shape[-1], chosen, row_list)
    todo = cells.rows()
    windows = position_blocks(chosen)
    done, total = 0, len(todo) * len(windows)
    with torch.no_grad():
        for window in windows:
            n_pos = window.stop - window.start
            for block in row_blocks(todo, n_pos, MATMUL_ROWS // 2):
                here = [row_list[r] for r in block]
                moved_a = lens_a.translate_points(hidden[block, window], here)
                moved_b = lens_b.translate_points(hidden[block, window], here)
                block_a = engine.read(moved_a, scratch=1)
                # KL(a || b) needs b exact where a is likely.
                block_b = engine.read(moved_b, head_ids(*block_a), scratch=0)
                for j, row in enumerate(block):
                    cells.add(row, _row(block_a, j), _row(block_b, j), window)
                    done += 1
                    if progress is not None:
                        progress(done, total)
    return cells.finish(model, tokens, prompt)


def compare(
    model: Any,
    lenses: Sequence[Lens],
    prompt: str | Tensor,
    *,
    pair: tuple[int, int] | None = (0, 1),
    target: str | int | None = None,
    top_k: int = 10,
    rows: Sequence[int] | None = None,
    positions: tuple[int, int] | None = None,
    precision: str | None = None,
    points: Sequence[str] = ("resid_pre",),
) -> Comparison:
    """Trajectories of several lenses and the divergence of two, sharing every readout.

    Equal to calling :func:`~lenskit.trajectory.trajectory` for each lens and
    :func:`lens_divergence` for the pair, but the model runs once and each lens reads
    each row once: the unembedding matmuls, which dominate the cost, are not repeated.

    Args:
        model: A ``TransformerBridge``.
        lenses: Lenses built for ``model``.
        prompt: Text (tokenized with the model's BOS token) or token ids.
        pair: Indices into ``lenses`` of the divergence's ``(a, b)``, or None for none.
        target: A token (text or id) whose probability and rank to follow.
        top_k: Top tokens kept per cell.
        rows: Compute only these rows (None: all); the others are NaN.
        positions: Compute only positions ``start..stop-1`` (None: all).
        precision: The readout's matmul precision (see :mod:`lenskit.readout`).
        points: Residual points read in each block (``("resid_pre", "resid_mid")``
            adds the ``L12.mid`` rows; every lens must read them).

    Returns:
        The :class:`Comparison`.
    """
    lenses = list(lenses)
    if not lenses:
        raise LenskitError("no lenses to compare: pass at least one")
    _check_model(model, lenses)
    if pair is not None and (len(set(pair)) != 2 or not all(0 <= i < len(lenses) for i in pair)):
        raise LenskitError(f"pair {pair} must name two different lenses among 0..{len(lenses) - 1}")
    row_list = point_rows(lenses, points)
    engine = Readout(lenses[0].adapter, precision)
    resolved = None if target is None else resolve_target(model.tokenizer, target)
    tokens = prompt_tokens(model, prompt)
    n_pos, out = tokens.shape[-1], len(row_list) - 1
    chosen = Cells.select(len(row_list), n_pos, rows, positions)
    hidden = row_residuals(model, tokens, row_list)  # [layer, pos, d_model]
    builders = [
        TrajectoryBuilder(model, lens, tokens, resolved, top_k, chosen, row_list) for lens in lenses
    ]
    cells = (
        None
        if pair is None
        else _DivergenceCells(lenses[pair[0]], lenses[pair[1]], n_pos, chosen, row_list)
    )
    # Which rows each lens reads: its trajectory's rows, and the output row for the pair.
    mine = {
        i: [
            r
            for r in chosen.rows
            if builders[i].covered[r]
            and (r in builders[i].lens_rows() or (cells and i in pair and r == out))
        ]
        for i, lens in enumerate(lenses)
    }
    wanted = sorted({r for rows_i in mine.values() for r in rows_i})
    with torch.no_grad():
        for window in position_blocks(chosen):
            final = engine.reference_logits(hidden[-1, window])
            reference = Reference.from_logits(final)
            head = head_ids(reference.probs)  # [pos, head]: read exactly in every row
            for builder in builders:
                if builder.wants_output:
                    builder.add(out, final, reference, window)
            del final
            for block in row_blocks(wanted, window.stop - window.start, MATMUL_ROWS):
                _compare_block(
                    engine,
                    lenses,
                    builders,
                    cells,
                    pair,
                    mine,
                    block,
                    hidden,
                    (window, reference, head),
                )
    return Comparison(
        trajectories=tuple(b.finish(prompt) for b in builders),
        divergence=None if cells is None else cells.finish(model, tokens, prompt),
    )


def _compare_block(
    engine: Readout,
    lenses: list[Lens],
    builders: list[TrajectoryBuilder],
    cells: _DivergenceCells | None,
    pair: tuple[int, int] | None,
    mine: dict[int, list[int]],
    block: list[int],
    hidden: Tensor,
    at: tuple[slice, Reference, Tensor],
) -> None:
    """One block of rows, read through each lens in turn (the pair's first lens first).

    The final norm and unembedding are the model's, shared by every lens. ``at`` is the
    window of positions, the reference there and its head (read exactly). Each lens's
    logits go into a reused buffer and are used before the next lens is read; the pair's
    first lens keeps its own buffer until its partner has been compared with it.
    """
    window, reference, head = at
    order = sorted(mine, key=lambda i: (pair is None or i != pair[0], i))
    first: dict[int, ReadLogits] = {}  # row -> the first lens's readout there
    first_head: dict[int, Tensor] = {}
    for i in order:
        rows_i = [r for r in block if r in mine[i]]
        if not rows_i:
            continue
        exact = head.expand(len(rows_i), *head.shape)
        if pair is not None and i == pair[1] and all(r in first for r in rows_i):
            # KL(a || b) needs b exact where a is likely, too.
            exact = torch.cat([exact, torch.stack([first_head[r] for r in rows_i])], -1)
        slot = 1 if pair is not None and i == pair[0] else 0
        moved = builders[i].translate(hidden[rows_i, window], rows_i)
        read = engine.read(moved, exact, scratch=slot)
        for j, row in enumerate(rows_i):
            here = _row(read, j)
            if row in builders[i].lens_rows():
                builders[i].add(row, here.logits, reference, window, here.candidates)
            if cells is not None and pair is not None and cells.covered[row]:
                if i == pair[0]:
                    first[row], first_head[row] = here, head_ids(*here)
                elif i == pair[1] and row in first:
                    cells.add(row, first[row], here, window)


def _row(read: ReadLogits, j: int) -> ReadLogits:
    """Row ``j`` of a readout of several rows."""
    return ReadLogits(read.logits[j], None if read.candidates is None else read.candidates[j])
