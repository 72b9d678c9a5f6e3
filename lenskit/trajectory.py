"""Layer-by-layer trajectories of a prompt's next-token predictions through a lens.

Example:
    >>> import lenskit
    >>> model = lenskit.load_model("tiny-llama")
    >>> traj = lenskit.trajectory(model, lenskit.get_lens("logit", model), "a b c d")
    >>> len(traj.top_tokens) == model.cfg.n_layers + 1  # block inputs, then the output
    True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lenskit.cells import Cells
from lenskit.errors import LenskitError
from lenskit.lenses.base import Lens, point_rows, row_blocks
from lenskit.metrics import LN2, Reference
from lenskit.models import Row
from lenskit.readout import MATMUL_ROWS, Readout, RowStats, head_ids, logit_stats
from lenskit.residual import capture, row_capture_points, token_texts, tokenize
from lenskit.trajectory_result import Trajectory

__all__ = [
    "POSITIONS_PER_BLOCK",
    "Trajectory",
    "TrajectoryBuilder",
    "check_token_ids",
    "position_blocks",
    "prompt_tokens",
    "resolve_target",
    "row_residuals",
    "trajectory",
]

POSITIONS_PER_BLOCK = 256
"""Positions read together: their ``p`` and a block of logits are what a readout holds."""


def resolve_target(tokenizer: Any, target: str | int) -> tuple[str, int]:
    """Turn a target token (text or id) into ``(text, id)``; it must be exactly one token."""
    vocab = len(tokenizer)
    if isinstance(target, int):
        if not 0 <= target < vocab:
            raise LenskitError(f"target id {target} is outside the vocabulary: use 0..{vocab - 1}")
        return tokenizer.decode([target]), target
    if not isinstance(target, str) or target == "":
        raise LenskitError("the target is empty: give one token, such as ' Paris'")
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise LenskitError(
            f"target {target!r} is {len(ids)} tokens {pieces}, not one: give a single token "
            "(mind the leading space, e.g. ' Paris')"
        )
    return target, int(ids[0])


class TrajectoryBuilder:
    """Fills a :class:`Trajectory` block by block from logits read elsewhere.

    :func:`trajectory` reads rows through one lens; :func:`lenskit.comparison.compare`
    shares each block of readouts between several lenses and their divergence. Only
    the statistics of each cell are kept, so memory does not grow with the vocabulary.

    Args:
        model: The ``TransformerBridge``.
        lens: The lens whose rows are added.
        tokens: ``[1, pos]`` prompt tokens.
        target: ``(text, id)`` of a target token, or None.
        top_k: Top tokens kept per cell.
        cells: The rows and positions to compute (None: all).
        rows: The rows (:class:`~lenskit.models.Row`) the grid holds, in order (None:
            the block inputs and the output).
    """

    def __init__(
        self,
        model: Any,
        lens: Lens,
        tokens: Int[Tensor, "1 pos"],
        target: tuple[str, int] | None,
        top_k: int,
        cells: Cells | None = None,
        rows: Sequence[Row] | None = None,
    ) -> None:
        adapter = lens.adapter
        lens.check_model(model)
        if (
            isinstance(top_k, bool)
            or not isinstance(top_k, int)
            or not 1 <= top_k <= adapter.d_vocab
        ):
            raise LenskitError(f"top_k must be an integer in 1..{adapter.d_vocab}, got {top_k!r}")
        self.rows = list(rows) if rows is not None else adapter.rows()
        n_rows, n_pos = len(self.rows), tokens.shape[-1]
        self.cells = cells or Cells.select(n_rows, n_pos)
        self.model, self.lens, self.tokens, self.target = model, lens, tokens, target
        self.top_k = top_k
        next_ids = torch.cat([tokens[0, 1:], tokens[0, -1:]]).cpu()  # the last one is masked
        self.ids = next_ids.unsqueeze(-1)
        if target is not None:
            self.ids = torch.cat([self.ids, torch.full_like(self.ids, target[1])], dim=-1)
        nan = torch.full((n_rows, n_pos), math.nan)
        self.entropy, self.kl, self.ce, self.tprob = (nan.clone() for _ in range(4))
        self.trank = torch.full((n_rows, n_pos), -1, dtype=torch.long)
        self.top_ids = torch.full((n_rows, n_pos, top_k), -1, dtype=torch.long)
        self.top_probs = nan.clone().unsqueeze(-1).repeat(1, 1, top_k)
        self.covered = torch.tensor([lens.covers_point(r.layer, r.point) for r in self.rows])

    @property
    def output_row(self) -> int:
        """Index of the model's output row (the last)."""
        return len(self.rows) - 1

    def lens_rows(self) -> list[int]:
        """Rows to read through the lens: covered, chosen, and not the model's output."""
        out = self.output_row
        return [r for r in self.cells.rows if self.covered[r] and r != out]

    @property
    def wants_output(self) -> bool:
        """Whether the model's output row is chosen and covered (added from ``p`` itself)."""
        out = self.output_row
        return bool(self.covered[out]) and out in self.cells.rows

    def translate(
        self, hidden: Float[Tensor, "layer pos d_model"], rows: Sequence[int]
    ) -> Float[Tensor, "layer pos d_model"]:
        """The lens's translation of rows ``rows`` (indices into this grid's rows)."""
        return self.lens.translate_points(hidden, [self.rows[r] for r in rows])

    def add(
        self,
        row: int,
        logits: Float[Tensor, "pos d_vocab"],
        reference: Reference,
        window: slice | None = None,
        candidates: Int[Tensor, "pos head"] | None = None,
    ) -> None:
        """Statistics of one row from its logits at positions ``window`` (None: all chosen).

        ``candidates`` are the readout's (:class:`~lenskit.readout.ReadLogits`), if any.
        """
        window = window or slice(self.cells.start, self.cells.stop)
        stats = logit_stats(
            logits,
            reference,
            self.ids[window],
            top_k=self.top_k,
            rank_columns=self.rank_columns,
            candidates=candidates,
        )
        self.add_stats(row, stats, window)

    @property
    def rank_columns(self) -> int:
        """How many columns of :attr:`ids` to rank: the target's, if there is one."""
        return 0 if self.target is None else 1

    def add_stats(self, row: int, stats: RowStats, window: slice) -> None:
        """Store one row's statistics at positions ``window``."""
        self.entropy[row, window] = stats.entropy.cpu()
        self.kl[row, window] = stats.kl.cpu()
        self.ce[row, window] = -stats.id_log_probs[:, 0].cpu() / LN2
        self.top_ids[row, window] = stats.top_ids.cpu()
        self.top_probs[row, window] = stats.top_probs.cpu()
        if self.target is not None:
            self.tprob[row, window] = stats.id_log_probs[:, 1].exp().cpu()
            self.trank[row, window] = stats.id_ranks[:, 1].cpu()

    def finish(self, prompt: str | Tensor) -> Trajectory:
        """The trajectory of every cell added."""
        adapter = self.lens.adapter
        self.ce[:, -1] = math.nan
        tokenizer = self.model.tokenizer
        top_tokens = tuple(
            tuple(tuple(cell) for cell in layer) for layer in token_texts(tokenizer, self.top_ids)
        )
        n_pos = self.tokens.shape[-1]
        target_id = None if self.target is None else self.target[1]
        return Trajectory(
            model_name=adapter.name,
            lens_kind=self.lens.kind,
            prompt=prompt if isinstance(prompt, str) else f"<{n_pos} token ids>",
            token_ids=self.tokens[0].cpu(),
            tokens=tuple(token_texts(tokenizer, self.tokens[0].cpu())),
            layer_labels=tuple(r.label for r in self.rows),
            covered=self.covered,
            top_ids=self.top_ids,
            top_probs=self.top_probs,
            top_tokens=top_tokens,
            entropy=self.entropy,
            kl_to_final=self.kl,
            cross_entropy=self.ce,
            target=None if self.target is None else self.target[0],
            target_id=target_id,
            target_prob=self.tprob if target_id is not None else None,
            target_rank=self.trank if target_id is not None else None,
            cells=self.cells,
            points=tuple(dict.fromkeys(r.point for r in self.rows if r.point != "resid_post")),
        )


def check_token_ids(model: Any, prompt: Any) -> None:
    """Refuse token ids that are not integers or lie outside the model's vocabulary.

    Raises:
        LenskitError: For float (or other non-integer) ids, or ids outside ``0..d_vocab-1``.
    """
    if isinstance(prompt, str):
        return
    ids = prompt if isinstance(prompt, Tensor) else None
    if ids is None:
        try:
            ids = torch.as_tensor(prompt)
        except (TypeError, ValueError, RuntimeError) as err:
            raise LenskitError(
                f"token ids must be a list or tensor of integers ({err}): "
                "pass e.g. torch.tensor([1, 2, 3])"
            ) from None
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise LenskitError(
            f"token ids must be integers, got {ids.dtype}: pass e.g. "
            "torch.tensor([1, 2, 3]) (or text), not floats that would be truncated"
        )
    vocab = int(model.cfg.d_vocab)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise LenskitError(
            f"token id {bad} is outside the model's vocabulary: use ids in 0..{vocab - 1}"
        )


def prompt_tokens(model: Any, prompt: str | Tensor) -> Int[Tensor, "1 pos"]:
    """The prompt's ``[1, pos]`` tokens, refusing a batch of several prompts or bad ids."""
    check_token_ids(model, prompt)
    tokens = tokenize(model, prompt)
    if tokens.shape[0] != 1:
        raise LenskitError("lenses read one prompt at a time: pass a single sequence")
    return tokens


def row_residuals(
    model: Any, tokens: Int[Tensor, "1 pos"], rows: Sequence[Row]
) -> Float[Tensor, "layer pos d_model"]:
    """The residual at each row for a one-prompt batch, from one forward pass."""
    cap = capture(model, tokens, points=row_capture_points(rows) or ("resid_pre",), logits=False)
    return cap.row_stack(rows)[:, 0]


def position_blocks(cells: Cells, size: int | None = None) -> list[slice]:
    """The chosen positions in blocks of ``size`` (None: :data:`POSITIONS_PER_BLOCK`).

    A block's ``p`` and logits are all that a readout holds at once, so memory does not
    grow with the prompt's length.
    """
    size = size or POSITIONS_PER_BLOCK
    return [slice(i, min(i + size, cells.stop)) for i in range(cells.start, cells.stop, size)]


def trajectory(
    model: Any,
    lens: Lens,
    prompt: str | Tensor,
    *,
    target: str | int | None = None,
    top_k: int = 10,
    rows: Sequence[int] | None = None,
    positions: tuple[int, int] | None = None,
    precision: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    points: Sequence[str] = ("resid_pre",),
) -> Trajectory:
    """Read a prompt's next-token prediction at every layer through a lens.

    Args:
        model: A ``TransformerBridge``.
        lens: A lens built for this model (see :func:`lenskit.get_lens`).
        prompt: Text (tokenized with the model's BOS token) or integer token ids.
        target: A token (text or id) whose probability and rank to follow.
        top_k: How many top tokens to keep per cell.
        rows: Compute only these rows (indices into the rows ``points`` give: block
            inputs ``0..n_layers-1`` and ``n_layers`` for the output by default); None
            for all. The others are NaN.
        positions: Compute only positions ``start..stop-1``; None for all.
        precision: The readout's matmul precision (see :mod:`lenskit.readout`; None:
            ``$LENSKIT_PRECISION``, else measured).
        on_progress: Called as ``on_progress(cells_done, cells_total)`` after each block.
        points: Residual points read in each block: ``("resid_pre",)`` (block inputs)
            or ``("resid_pre", "resid_mid")`` (also the stream between attention and MLP,
            rows ``L12.mid``; the lens must have maps for them).

    Returns:
        The :class:`Trajectory`.

    Raises:
        LenskitError: For bad arguments, or sub-layer rows the model or lens lacks.
    """
    lens.check_model(model)  # before the forward pass
    row_list = point_rows([lens], points)
    engine = Readout(lens.adapter, precision)
    resolved = None if target is None else resolve_target(model.tokenizer, target)
    tokens = prompt_tokens(model, prompt)
    cells = Cells.select(len(row_list), tokens.shape[-1], rows, positions)
    builder = TrajectoryBuilder(model, lens, tokens, resolved, top_k, cells, row_list)
    hidden = row_residuals(model, tokens, row_list)
    todo = builder.lens_rows()
    total, done = (len(todo) + int(builder.wants_output)) * cells.n_pos, 0
    with torch.no_grad():
        for window in position_blocks(cells):
            final = engine.reference_logits(hidden[-1, window])
            reference = Reference.from_logits(final)
            head = head_ids(reference.probs)  # [pos, head]: read exactly in every row
            n_pos = window.stop - window.start
            if builder.wants_output:
                builder.add(builder.output_row, final, reference, window)
                done += n_pos
            del final
            # A few rows per readout, so each matmul streams W_U once for many cells.
            for block in row_blocks(todo, n_pos, MATMUL_ROWS):
                moved = builder.translate(hidden[block, window], block)  # [row, pos, d]
                stats = engine.read_stats(
                    moved,
                    reference,
                    builder.ids[window],
                    top_k=builder.top_k,
                    rank_columns=builder.rank_columns,
                    head=head,
                )
                for j, row in enumerate(block):
                    builder.add_stats(row, _row(stats, j), window)
                done += len(block) * n_pos
                if on_progress is not None:
                    on_progress(done, total)
    return builder.finish(prompt)


def _row(stats: RowStats, j: int) -> RowStats:
    """Row ``j`` of statistics shaped ``[row, pos, ...]``."""
    return RowStats(*(getattr(stats, f.name)[j] for f in dataclasses.fields(RowStats)))
