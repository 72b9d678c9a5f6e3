"""Which cells of a prompt's layer x position grid a readout computes.

A trajectory or a divergence map has one row per lens row (the block inputs, then
the model's output) and one column per prompt position. Reading every cell costs one
unembedding matmul per cell, so a view that shows only some rows (a layer stride) or
some positions (a token range) can ask for just those: the cells it holds are then
exactly the cells it shows, and the others are NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool
from torch import Tensor

from lenskit.errors import LenskitError

__all__ = ["Cells"]


@dataclass(frozen=True)
class Cells:
    """A set of rows times a half-open range of positions.

    Attributes:
        rows: Row indices, ascending, without repeats.
        start: First position.
        stop: One past the last position.
    """

    rows: tuple[int, ...]
    start: int
    stop: int

    @classmethod
    def select(
        cls,
        n_rows: int,
        n_pos: int,
        rows: Sequence[int] | None = None,
        positions: tuple[int, int] | None = None,
    ) -> Cells:
        """Checked cells of an ``n_rows x n_pos`` grid (None: every row / every position).

        Raises:
            LenskitError: For rows outside ``0..n_rows-1``, no rows, or an empty or
                out-of-range position range.
        """
        if rows is None:
            chosen = tuple(range(n_rows))
        else:
            if isinstance(rows, (str, bytes)) or not all(
                isinstance(r, int) and not isinstance(r, bool) for r in rows
            ):
                raise LenskitError(f"rows must be integers, got {rows!r}: e.g. rows=[0, 10, 30]")
            chosen = tuple(sorted(set(rows)))
            if not chosen:
                raise LenskitError("no rows chosen: give at least one row, or rows=None for all")
            bad = [r for r in chosen if not 0 <= r < n_rows]
            if bad:
                raise LenskitError(
                    f"rows {bad} are outside 0..{n_rows - 1} (the block inputs, then the "
                    f"output row {n_rows - 1}): choose rows in that range"
                )
        if positions is None:
            start, stop = 0, n_pos
        else:
            if (
                not isinstance(positions, (tuple, list))
                or len(positions) != 2
                or not all(isinstance(p, int) and not isinstance(p, bool) for p in positions)
            ):
                raise LenskitError(
                    f"positions must be (start, stop), got {positions!r}: e.g. positions=(0, 32)"
                )
            start, stop = positions
            if not 0 <= start < stop <= n_pos:
                raise LenskitError(
                    f"positions {tuple(positions)} select no positions of the {n_pos}-token "
                    f"prompt: use 0 <= start < stop <= {n_pos}"
                )
        return cls(rows=chosen, start=start, stop=stop)

    @property
    def n_pos(self) -> int:
        """Number of positions."""
        return self.stop - self.start

    def mask(self, n_rows: int, n_pos: int) -> Bool[Tensor, "layer pos"]:
        """True at the cells held, on the full ``n_rows x n_pos`` grid."""
        out = torch.zeros(n_rows, n_pos, dtype=torch.bool)
        out[list(self.rows), self.start : self.stop] = True
        return out

    def fits(self, n_rows: int, n_pos: int) -> bool:
        """Whether every cell lies inside an ``n_rows x n_pos`` grid."""
        return all(0 <= r < n_rows for r in self.rows) and 0 <= self.start < self.stop <= n_pos

    def check_shown(self, rows: Sequence[int], cols: Sequence[int], what: str) -> None:
        """Refuse to show cells that were not computed.

        Raises:
            LenskitError: If a shown row or position lies outside these cells.
        """
        missing_rows = sorted(set(rows) - set(self.rows))
        outside = [c for c in cols if not self.start <= c < self.stop]
        if missing_rows or outside:
            raise LenskitError(
                f"this {what} holds rows {list(self.rows)} and positions "
                f"{self.start}..{self.stop - 1} only, not the ones asked to show: plot within "
                "those, or compute it with rows=None, positions=None"
            )
