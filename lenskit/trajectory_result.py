"""The result of a trajectory: a prompt's predictions at every lens row and position.

:class:`Trajectory` holds the numbers (information in bits) and turns them into a
long-form table (:meth:`Trajectory.to_frame`) or JSON (:meth:`Trajectory.to_dict`);
:func:`lenskit.trajectory.trajectory` computes one.

Example:
    >>> import lenskit
    >>> from lenskit.trajectory_result import Trajectory
    >>> model = lenskit.load_model("tiny-llama")
    >>> traj = lenskit.trajectory(model, lenskit.get_lens("logit", model), "a b c d")
    >>> isinstance(traj, Trajectory), len(traj.to_frame()) == traj.n_layers * len(traj.tokens)
    (True, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lenskit.cells import Cells

__all__ = ["Trajectory", "grid_cells"]


def grid_cells(
    what: str,
    cells: Cells | None,
    layer_labels: tuple[str, ...],
    tokens: tuple[str, ...],
    n_layer: int,
    n_pos: int,
) -> Cells:
    """The cells of an ``n_layer x n_pos`` result (None: all), checked against its labels.

    Raises:
        ValueError: For cells outside the grid, or labels and tokens that do not match it.
    """
    if cells is None:
        cells = Cells.select(n_layer, n_pos)
    elif not cells.fits(n_layer, n_pos):
        raise ValueError(f"{what} cells {cells} lie outside {n_layer}x{n_pos}")
    if len(tokens) != n_pos or len(layer_labels) != n_layer:
        raise ValueError(
            f"{what} has {n_layer}x{n_pos} cells but {len(layer_labels)} layer "
            f"labels and {len(tokens)} tokens"
        )
    return cells


@dataclass(frozen=True)
class Trajectory:
    """A prompt's predictions at every lens row and position; information in bits.

    Rows are the block inputs ``0..n_layers-1`` and then the model's own output; with
    sub-layer rows (``points=("resid_pre", "resid_mid")``) each block has two, ``L12``
    and ``L12.mid`` (the stream between attention and MLP), so row ``2 * i + 1`` is
    ``Li.mid`` and row ``2 * n_layers`` the output. ``layer`` indices are row indices.
    Cross-entropy is of the actual next token (NaN at the last position); rows the
    lens does not cover are NaN and ``covered`` is False there. A trajectory computed
    for some rows or positions only (``cells``) is NaN outside them.

    Attributes:
        model_name: The model's name.
        lens_kind: The lens kind.
        prompt: The prompt text (or a description of the token ids).
        token_ids: Input token ids.
        tokens: Input tokens as text.
        layer_labels: One label per row (``L0`` ... and ``output``).
        covered: Whether the lens reads each row.
        top_ids: Top-k token ids per row and position.
        top_probs: Their probabilities.
        top_tokens: Their text, nested ``[layer][pos][k]``.
        entropy: Entropy of the lens distribution.
        kl_to_final: ``KL(model output || lens)``.
        cross_entropy: ``-log2 q(next token)``.
        target: The target token's text, if one was given.
        target_id: Its id.
        target_prob: Its probability per row and position.
        target_rank: Its zero-based rank (0 = top-1).
        cells: The rows and positions computed (None: all of them).
        points: The residual points read inside each block (``resid_pre``, and
            ``resid_mid`` for sub-layer rows).
    """

    model_name: str
    lens_kind: str
    prompt: str
    token_ids: Int[Tensor, " pos"]
    tokens: tuple[str, ...]
    layer_labels: tuple[str, ...]
    covered: Bool[Tensor, " layer"]
    top_ids: Int[Tensor, "layer pos k"]
    top_probs: Float[Tensor, "layer pos k"]
    top_tokens: tuple[tuple[tuple[str, ...], ...], ...] = field(repr=False)
    entropy: Float[Tensor, "layer pos"] = field(repr=False)
    kl_to_final: Float[Tensor, "layer pos"] = field(repr=False)
    cross_entropy: Float[Tensor, "layer pos"] = field(repr=False)
    target: str | None = None
    target_id: int | None = None
    target_prob: Float[Tensor, "layer pos"] | None = field(default=None, repr=False)
    target_rank: Int[Tensor, "layer pos"] | None = field(default=None, repr=False)
    cells: Cells | None = None
    points: tuple[str, ...] = ("resid_pre",)

    def __post_init__(self) -> None:
        n_layer, n_pos = self.entropy.shape
        cells = grid_cells("trajectory", self.cells, self.layer_labels, self.tokens, n_layer, n_pos)
        object.__setattr__(self, "cells", cells)
        for name in ("kl_to_final", "cross_entropy", "top_probs", "top_ids"):
            if tuple(getattr(self, name).shape[:2]) != (n_layer, n_pos):
                raise ValueError(f"trajectory field {name} does not match {n_layer}x{n_pos}")
        if (self.target_prob is None) != (self.target_id is None):
            raise ValueError("target_prob and target_id must be given together")

    @property
    def n_layers(self) -> int:
        """Number of rows (block inputs plus the output row)."""
        return len(self.layer_labels)

    @property
    def next_tokens(self) -> tuple[str | None, ...]:
        """The actual next token at each position (None at the last)."""
        return (*self.tokens[1:], None)

    def to_frame(self) -> pd.DataFrame:
        """One row per computed (layer, position) cell, long-form; top-k as list columns."""
        records = []
        for row in self.cells.rows:
            for pos in range(self.cells.start, self.cells.stop):
                record: dict[str, Any] = {
                    "layer": row,
                    "layer_label": self.layer_labels[row],
                    "covered": bool(self.covered[row]),
                    "pos": pos,
                    "input_token": self.tokens[pos],
                    "next_token": self.next_tokens[pos],
                    "top1_token": self.top_tokens[row][pos][0],
                    "top1_prob": float(self.top_probs[row, pos, 0]),
                    "entropy_bits": float(self.entropy[row, pos]),
                    "kl_to_final_bits": float(self.kl_to_final[row, pos]),
                    "cross_entropy_bits": float(self.cross_entropy[row, pos]),
                    "topk_tokens": list(self.top_tokens[row][pos]),
                    "topk_probs": [float(p) for p in self.top_probs[row, pos]],
                }
                if self.target_prob is not None and self.target_rank is not None:
                    record["target_prob"] = float(self.target_prob[row, pos])
                    record["target_rank"] = int(self.target_rank[row, pos])
                records.append(record)
        frame = pd.DataFrame.from_records(records)
        frame.attrs.update(
            model=self.model_name, lens=self.lens_kind, prompt=self.prompt, target=self.target
        )
        return frame

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary: metadata and one record per cell (NaN as None)."""
        cells = self.to_frame().astype(object).where(lambda f: f.notna(), None)
        return {
            "model": self.model_name,
            "lens": self.lens_kind,
            "prompt": self.prompt,
            "target": self.target,
            "target_id": self.target_id,
            "units": "bits",
            "points": list(self.points),
            "layers": list(self.layer_labels),
            "tokens": list(self.tokens),
            "cells": [_clean(r) for r in cells.to_dict(orient="records")],
        }


def _clean(record: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in record.items():
        if isinstance(value, float) and math.isnan(value):
            value = None
        out[key] = value
    return out
