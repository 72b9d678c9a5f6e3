"""The results of comparing lenses: per-cell divergences and several trajectories.

:class:`LensDivergence` holds how far two lenses' full next-token distributions lie
apart at each (layer, position) cell (``KL(a || b)`` and Jensen-Shannon in bits,
total variation as a probability); :class:`Comparison` holds several lenses'
trajectories and the divergence of one pair. :mod:`lenskit.comparison` computes them.

Example:
    >>> import lenskit
    >>> from lenskit.comparison import lens_divergence
    >>> from lenskit.comparison_result import LensDivergence
    >>> model = lenskit.load_model("tiny-llama")
    >>> lens = lenskit.get_lens("logit", model)
    >>> result = lens_divergence(model, lens, lens, "a b c d")
    >>> isinstance(result, LensDivergence), float(result.kl.nan_to_num().abs().max())
    (True, 0.0)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lenskit.cells import Cells
from lenskit.errors import LenskitError
from lenskit.trajectory_result import Trajectory, grid_cells

__all__ = ["MEASURES", "Comparison", "LensDivergence"]

MEASURES: dict[str, str] = {
    "kl": "KL(a ‖ b) (bits)",
    "js": "Jensen-Shannon (bits)",
    "tv": "total variation",
}


@dataclass(frozen=True)
class LensDivergence:
    """Per-cell divergence between two lenses' distributions over one prompt.

    Rows are the block inputs ``0..n_layers-1`` and then the model's final
    residual. A row is covered only if both lenses read it; uncovered rows are NaN,
    and so are cells outside ``cells`` when only some were computed.

    Attributes:
        model_name: The model's name.
        lens_a: Kind of the first lens (the ``p`` of ``KL(p || q)``).
        lens_b: Kind of the second lens.
        prompt: The prompt text (or a description of the token ids).
        token_ids: Input token ids.
        tokens: Input tokens as text.
        layer_labels: One label per row (``L0`` ... and ``output``).
        covered: Whether both lenses read each row.
        kl: ``KL(a || b)`` in bits.
        js: Jensen-Shannon divergence in bits (between 0 and 1).
        tv: Total variation distance (a probability, between 0 and 1).
        top1_a: The first lens's most likely token per cell, nested ``[layer][pos]``
            (empty strings in uncovered rows).
        top1_b: The second lens's most likely token per cell.
        cells: The rows and positions computed (None: all of them).
    """

    model_name: str
    lens_a: str
    lens_b: str
    prompt: str
    token_ids: Int[Tensor, " pos"]
    tokens: tuple[str, ...]
    layer_labels: tuple[str, ...]
    covered: Bool[Tensor, " layer"]
    kl: Float[Tensor, "layer pos"] = field(repr=False)
    js: Float[Tensor, "layer pos"] = field(repr=False)
    tv: Float[Tensor, "layer pos"] = field(repr=False)
    top1_a: tuple[tuple[str, ...], ...] = field(repr=False)
    top1_b: tuple[tuple[str, ...], ...] = field(repr=False)
    cells: Cells | None = None

    def __post_init__(self) -> None:
        n_layer, n_pos = self.kl.shape
        cells = grid_cells("divergence", self.cells, self.layer_labels, self.tokens, n_layer, n_pos)
        object.__setattr__(self, "cells", cells)
        for name in ("js", "tv"):
            if tuple(getattr(self, name).shape) != (n_layer, n_pos):
                raise ValueError(f"divergence field {name} does not match {n_layer}x{n_pos}")
        if tuple(self.covered.shape) != (n_layer,) or tuple(self.token_ids.shape) != (n_pos,):
            raise ValueError("divergence covered/token_ids do not match its cells")
        for name in ("top1_a", "top1_b"):
            grid = getattr(self, name)
            if len(grid) != n_layer or any(len(row) != n_pos for row in grid):
                raise ValueError(f"divergence field {name} does not match {n_layer}x{n_pos}")

    @property
    def n_layers(self) -> int:
        """Number of rows (block inputs plus the output row)."""
        return len(self.layer_labels)

    def measure(self, name: str) -> Float[Tensor, "layer pos"]:
        """One measure by name: ``"kl"``, ``"js"`` or ``"tv"``."""
        if name not in MEASURES:
            raise LenskitError(
                f"unknown divergence measure {name!r}: use one of {', '.join(MEASURES)}"
            )
        return getattr(self, name)

    def to_frame(self) -> pd.DataFrame:
        """One row per computed (layer, position) cell, long-form."""
        rows, n_pos = self.cells.rows, self.cells.n_pos
        layer = torch.tensor(rows, dtype=torch.long).repeat_interleave(n_pos)
        pos = torch.arange(self.cells.start, self.cells.stop).repeat(len(rows))
        cells = list(zip(layer.tolist(), pos.tolist(), strict=True))
        frame = pd.DataFrame(
            {
                "layer": layer.numpy(),
                "layer_label": [self.layer_labels[i] for i in layer.tolist()],
                "covered": self.covered[layer].numpy(),
                "pos": pos.numpy(),
                "input_token": [self.tokens[i] for i in pos.tolist()],
                "top1_a": [self.top1_a[r][p] for r, p in cells],
                "top1_b": [self.top1_b[r][p] for r, p in cells],
                "kl_bits": self.kl[layer, pos].double().numpy(),
                "js_bits": self.js[layer, pos].double().numpy(),
                "tv": self.tv[layer, pos].double().numpy(),
            }
        )
        frame.attrs.update(
            model=self.model_name,
            lens=f"{self.lens_a} vs {self.lens_b}",
            lens_a=self.lens_a,
            lens_b=self.lens_b,
            prompt=self.prompt,
        )
        return frame


@dataclass(frozen=True)
class Comparison:
    """Several lenses' trajectories over one prompt, and the divergence of one pair.

    Attributes:
        trajectories: One :class:`~lenskit.trajectory.Trajectory` per lens, in order.
        divergence: The divergence between the chosen pair, or None.
    """

    trajectories: tuple[Trajectory, ...]
    divergence: LensDivergence | None
