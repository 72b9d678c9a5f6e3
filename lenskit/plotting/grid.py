"""Shared pieces of the layer x position heatmaps: colour axes, ticks, hover formats."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go

from lenskit.plotting.style import MISSING_COLOR, TEMPLATE, display_token

__all__ = [
    "NA",
    "Statistic",
    "color_axis",
    "field",
    "fmt_bits",
    "fmt_prob",
    "grid_axes",
    "heatmap_trace",
]


@dataclass(frozen=True)
class Statistic:
    """How one trajectory statistic is coloured.

    Attributes:
        label: Axis and colour-bar label.
        colorscale: A Plotly colour scale (for trajectories: light = poor, dark = good).
        fixed: A fixed colour range, or None for ``0 .. max`` of the shown cells.
        log_rank: Colour by ``log10(1 + rank)`` with colour-bar ticks at 1, 10, 100, ...
    """

    label: str
    colorscale: str
    fixed: tuple[float, float] | None = None
    log_rank: bool = False


NA = "–"


def fmt_prob(p: float) -> str:
    """A probability for hover text: ``0.245``, ``4.5e-4``, or ``–`` for NaN."""
    if math.isnan(p):
        return NA
    return f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}".replace("e-0", "e-")


def fmt_bits(x: float) -> str:
    """A value in bits for hover text: ``5.35``, or ``–`` for NaN."""
    return NA if math.isnan(x) else f"{x:.2f}"


def field(i: int) -> str:
    """Hover-template placeholder of the ``i``-th per-cell field."""
    return f"%{{customdata[{i}]}}"


def heatmap_trace(
    values: np.ndarray,
    text: list[list[str]],
    hover: list[list[list[str]]],
    template: str,
    cols: list[int],
    *,
    show_text: bool,
    xgap: int = 1,
    name: str | None = None,
) -> go.Heatmap:
    """A layer x position heatmap trace; row ``i`` of ``values`` is drawn at ``y = i``.

    Arrays go in as NumPy arrays: Plotly validates them quickly and writes numbers as
    compact binary. NaN cells are drawn blank (the grey plot background), never as numbers.

    Args:
        values: ``[rows, cols]`` colour values, NaN for none.
        text: ``[rows][cols]`` cell labels.
        hover: ``[rows][cols][fields]`` hover fields read by ``template``.
        template: The hover template.
        cols: The positions of the columns (the x values).
        show_text: Whether to draw the cell labels.
        xgap: Pixels between columns.
        name: Trace name.

    Returns:
        The trace, on the shared ``coloraxis``.
    """
    return go.Heatmap(
        x=np.asarray(cols),
        y=np.arange(values.shape[0]),
        z=np.asarray(values, dtype=float),
        text=np.array(text, dtype=str),
        customdata=np.array(hover, dtype=str),
        texttemplate="%{text}" if show_text else None,
        textfont={"size": 10},
        hovertemplate=template,
        coloraxis="coloraxis",
        xgap=xgap,
        ygap=1,
        name=name,
    )


def color_axis(spec: Statistic, values: list[np.ndarray], colorscale: str) -> dict:
    """A ``layout.coloraxis`` for ``spec`` spanning the shown ``values`` (of every panel)."""
    finite = [v[np.isfinite(v)] for v in values]
    top = max((float(v.max()) for v in finite if v.size), default=1.0)
    axis: dict = {
        "colorscale": colorscale,
        "colorbar": {"title": {"text": spec.label, "side": "right"}},
    }
    if spec.fixed is not None:
        axis["cmin"], axis["cmax"] = spec.fixed
    elif spec.log_rank:
        axis["cmin"], axis["cmax"] = 0.0, max(1.0, top)
        ticks = list(range(math.floor(axis["cmax"]) + 1))
        axis["colorbar"].update(tickvals=ticks, ticktext=[f"{10**t:,}" for t in ticks])
    else:
        axis["cmin"], axis["cmax"] = 0.0, max(top, 1e-6)
    return axis


def grid_axes(
    fig: go.Figure,
    labels: Sequence[str],
    covered: Sequence[bool],
    tokens: Sequence[str],
    rows: list[int],
    cols: list[int],
    size: dict,
    panels: Sequence[tuple[str, Sequence[bool]]],
) -> None:
    """Ticks (tokens, layer labels), sizing, and a note on each panel's uncovered rows."""
    step = int(size["tick_step"])
    shown = cols[::step]
    ticktext = [display_token(tokens[p]) for p in shown]
    longest = max(len(display_token(tokens[p], escape=False)) for p in shown)
    room = size["cell_w"] * step
    angle = 0 if longest * 7.5 <= room else (-45 if room >= 20 else -90)
    fig.update_xaxes(
        tickmode="array",
        tickvals=shown,
        ticktext=ticktext,
        showgrid=False,
        zeroline=False,
        tickangle=angle,
        tickfont={"size": 11},
        title_text="input token",
    )
    ylabels = [labels[r] if covered[r] else f"{labels[r]} (not covered)" for r in rows]
    fig.update_yaxes(
        tickmode="array",
        tickvals=list(range(len(rows))),
        ticktext=ylabels,
        showgrid=False,
        zeroline=False,
        tickfont={"size": 11},
    )
    fig.layout.yaxis.title.text = "layer"  # the first (left) panel only
    for i, (name, panel_covered) in enumerate(panels, start=1):
        axis = "" if i == 1 else str(i)
        for y, row in enumerate(rows):
            if not panel_covered[row]:
                fig.add_annotation(
                    x=(cols[0] + cols[-1]) / 2,
                    y=y,
                    xref=f"x{axis}",
                    yref=f"y{axis}",
                    text=f"not covered by the {name} lens",
                    showarrow=False,
                    font={"size": 11, "color": "#555555"},
                )
    tick_room = 7 * max(len(label) for label in ylabels) + 50
    fig.update_layout(
        template=TEMPLATE,
        plot_bgcolor=MISSING_COLOR,
        width=size["width"],
        height=size["height"] + (0 if angle == 0 else 6 * min(longest, 16)),
        margin={"l": max(90, tick_room), "b": 70 + (0 if angle == 0 else 6 * min(longest, 16))},
    )
