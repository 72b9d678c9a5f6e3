"""Heatmap of where two lenses disagree (see :func:`lenskit.comparison.lens_divergence`)."""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go

from lenskit.comparison import MEASURES, LensDivergence
from lenskit.plotting.grid import (
    NA,
    Statistic,
    color_axis,
    field,
    fmt_bits,
    fmt_prob,
    grid_axes,
    heatmap_trace,
)
from lenskit.plotting.style import (
    FIGURE_WIDTH,
    coverage_note,
    display_token,
    grid_size,
    select_positions,
    select_rows,
)

__all__ = ["divergence_heatmap"]

_DIVERGENCE_SCALE = "Reds"  # a different hue: light = the lenses agree, red = they differ


def divergence_heatmap(
    div: LensDivergence,
    *,
    measure: str = "js",
    layer_stride: int = 1,
    token_range: tuple[int, int] | slice | None = None,
    title: str | None = None,
    width: int = FIGURE_WIDTH,
) -> go.Figure:
    """Heatmap of how far two lenses disagree at each (layer, position) cell.

    Oriented like :func:`trajectory_heatmap`. White is agreement and red is
    disagreement: Jensen-Shannon (bits) and total variation on a fixed 0..1
    scale, KL from 0 to the largest shown value. Cells show the value; hovering
    shows all three measures and both lenses' top-1 tokens.

    Args:
        div: The divergence (see :func:`lenskit.comparison.lens_divergence`).
        measure: ``"kl"``, ``"js"`` or ``"tv"``.
        layer_stride: Show every n-th row (the output row is always shown).
        token_range: Positions to show: ``(start, stop)`` (half-open) or a slice.
        title: Figure title.
        width: Figure width in pixels; cells and labels are sized for it.

    Returns:
        The figure.
    """
    values = div.measure(measure).double().numpy()
    rows = select_rows(div.layer_labels, layer_stride)
    cols = select_positions(len(div.tokens), token_range)
    div.cells.check_shown(rows, cols, "divergence")
    size = grid_size(len(rows), len(cols), width=width)
    shown = values[np.ix_(rows, cols)]
    text = [["" if math.isnan(v) else f"{v:.2f}" for v in row] for row in shown.tolist()]
    hover = []
    for r in rows:
        covered = bool(div.covered[r])
        label = div.layer_labels[r] if covered else f"{div.layer_labels[r]} (not covered)"
        hover.append(
            [
                [
                    label,
                    f"{p}: {display_token(div.tokens[p])}",
                    fmt_bits(float(div.kl[r, p])),
                    fmt_bits(float(div.js[r, p])),
                    fmt_prob(float(div.tv[r, p])),
                    display_token(div.top1_a[r][p]) if covered else NA,
                    display_token(div.top1_b[r][p]) if covered else NA,
                ]
                for p in cols
            ]
        )
    template = (
        "<br>".join(
            [
                f"<b>{field(0)}</b> · pos {field(1)}",  # %{x} would show the tick label
                f"KL({div.lens_a} ‖ {div.lens_b}) {field(2)} bits",
                f"Jensen-Shannon {field(3)} bits · total variation {field(4)}",
                f"top-1 {div.lens_a}: {field(5)} · {div.lens_b}: {field(6)}",
            ]
        )
        + "<extra></extra>"
    )
    label = f"KL({div.lens_a} ‖ {div.lens_b}) (bits)" if measure == "kl" else MEASURES[measure]
    spec = Statistic(label, _DIVERGENCE_SCALE, None if measure == "kl" else (0.0, 1.0))
    fig = go.Figure()  # add_trace validates the big arrays once; Figure(trace) copies them
    fig.add_trace(
        heatmap_trace(
            shown,
            text,
            hover,
            template,
            cols,
            show_text=bool(size["show_text"]) and int(size["text_chars"]) >= 4,
            xgap=int(size["xgap"]),
        )
    )
    note = coverage_note([div.layer_labels[r] for r in rows], [bool(div.covered[r]) for r in rows])
    fig.update_layout(
        coloraxis=color_axis(spec, [shown], _DIVERGENCE_SCALE),
        title_text=title
        or f"{spec.label}: {div.lens_a} vs {div.lens_b} lens · {div.model_name}"
        + (f"<br><sup>both lenses: {note} (grey rows)</sup>" if note else ""),
    )
    grid_axes(fig, div.layer_labels, div.tokens, rows, cols, size, [""])
    fig.layout.yaxis.title.text = "layer"
    return fig
