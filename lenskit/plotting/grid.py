"""Shared pieces of the layer x position heatmaps: panels, colour axes, ticks, hover formats.

A figure holds one or more panels stacked at full width, all on the one x axis (the
input positions), each with its own y axis (the rows); hovering a cell shows the same
cell of every panel, and an optional invisible marker layer makes cells clickable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go

from lenskit.plotting.style import LABEL_PX, MISSING_COLOR, TEMPLATE, TOKEN_KEY, display_token

__all__ = [
    "NA",
    "SELECT_COLOR",
    "Statistic",
    "axis_name",
    "click_layer",
    "color_axis",
    "field",
    "fmt_bits",
    "fmt_prob",
    "grid_axes",
    "heatmap_trace",
    "mark_cell",
]

SELECT_COLOR = "#D55E00"  # the outline of the chosen cell (Okabe-Ito vermillion)


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


def axis_name(panel: int) -> str:
    """The y axis of panel ``panel`` (0 = top): ``y``, ``y2``, ..."""
    return "y" if panel == 0 else f"y{panel + 1}"


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
    panel: int = 0,
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
        panel: The panel (0 = top) whose y axis the trace uses.

    Returns:
        The trace, on the shared ``coloraxis`` and the shared x axis.
    """
    return go.Heatmap(
        x=np.asarray(cols),
        y=np.arange(values.shape[0]),
        z=np.asarray(values, dtype=float),
        text=np.array(text, dtype=str),
        customdata=np.array(hover, dtype=str),
        texttemplate="%{text}" if show_text else None,
        textfont={"size": LABEL_PX},
        hovertemplate=template,
        coloraxis="coloraxis",
        xgap=xgap,
        ygap=1,
        name=name,
        xaxis="x",
        yaxis=axis_name(panel),
    )


def click_layer(n_rows: int, cols: list[int], panel: int, name: str) -> go.Scatter:
    """Invisible markers on every cell of a panel, so a click reports its cell.

    Heatmap cells send no selection events to a host page (Streamlit's ``on_select``);
    markers do: a click selects the marker at the cell's centre, ``x`` = the position
    and ``y`` = the row's index among the shown rows.
    """
    xs, ys = np.meshgrid(np.asarray(cols), np.arange(n_rows))
    return go.Scatter(
        x=xs.ravel(),
        y=ys.ravel(),
        mode="markers",
        marker={"symbol": "square", "size": 12, "opacity": 0},
        selected={"marker": {"opacity": 0}},
        unselected={"marker": {"opacity": 0}},
        hoverinfo="none",
        showlegend=False,
        name=f"{name} cells",
        xaxis="x",
        yaxis=axis_name(panel),
    )


def mark_cell(fig: go.Figure, x: int, y: int, panels: int) -> None:
    """Outline the cell at position ``x`` and shown row ``y`` in every panel."""
    for panel in range(panels):
        fig.add_shape(
            type="rect",
            x0=x - 0.5,
            x1=x + 0.5,
            y0=y - 0.5,
            y1=y + 0.5,
            xref="x",
            yref=axis_name(panel),
            line={"color": SELECT_COLOR, "width": 3},
            fillcolor="rgba(0,0,0,0)",
        )


def color_axis(spec: Statistic, values: list[np.ndarray], colorscale: str) -> dict:
    """A ``layout.coloraxis`` for ``spec`` spanning the shown ``values`` (of every panel)."""
    finite = [v[np.isfinite(v)] for v in values]
    top = max((float(v.max()) for v in finite if v.size), default=1.0)
    axis: dict = {
        "colorscale": colorscale,
        "colorbar": {
            "title": {"text": spec.label, "side": "right"},
            "len": 1.0,
            "lenmode": "fraction",
            "y": 1.0,
            "yanchor": "top",
            "thickness": 14,
        },
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
    tokens: Sequence[str],
    rows: list[int],
    cols: list[int],
    size: dict,
    titles: Sequence[str],
) -> None:
    """Stack the panels: row labels on each, input tokens under each, a title above each.

    The last panel's tokens are the x axis's tick labels; the panels above it get the
    same labels as a row of text under them. Tokens and cells show ``·`` for a space and
    ``↵`` for a newline (the x axis title says so).

    Args:
        fig: The figure, its traces already on the panels' axes.
        labels: Every row's label (``L0`` ... ``output``).
        tokens: Every position's input token.
        rows: The shown rows.
        cols: The shown positions.
        size: :func:`lenskit.plotting.style.grid_size` of the figure.
        titles: One title per panel (top first); ``""`` for none.
    """
    panels = len(titles)
    step = int(size["tick_step"])
    shown = cols[::step]
    ticktext = [display_token(tokens[p], int(size["tick_chars"])) for p in shown]
    fig.update_xaxes(
        tickmode="array",
        tickvals=shown,
        ticktext=ticktext,
        showgrid=False,
        zeroline=False,
        tickangle=0,
        tickfont={"size": LABEL_PX},
        title_text=f"input token ({TOKEN_KEY})",
        range=[cols[0] - 0.5, cols[-1] + 0.5],
        anchor=axis_name(panels - 1),
    )
    plot_h = panels * size["panel_h"] + (panels - 1) * size["gap"]
    ylabels = [labels[r] for r in rows]
    for panel, title in enumerate(titles):
        top = panel * (size["panel_h"] + size["gap"])
        domain = [1 - (top + size["panel_h"]) / plot_h, 1 - top / plot_h]
        name = "yaxis" if panel == 0 else f"yaxis{panel + 1}"
        fig.layout[name] = {
            "domain": domain,
            "tickmode": "array",
            "tickvals": list(range(len(rows))),
            "ticktext": ylabels,
            "range": [-0.5, len(rows) - 0.5],
            "showgrid": False,
            "zeroline": False,
            "tickfont": {"size": LABEL_PX},
            "anchor": "x",
        }
        ref = f"{axis_name(panel)} domain"
        if title:
            fig.add_annotation(
                x=0,
                y=1,
                xref="paper",
                yref=ref,
                yshift=4,
                xanchor="left",
                yanchor="bottom",
                text=title,
                showarrow=False,
                font={"size": 13},
            )
        if panel < panels - 1:  # the tokens under every panel but the last (its axis ticks)
            for pos, text in zip(shown, ticktext, strict=True):
                fig.add_annotation(
                    x=pos,
                    y=0,
                    xref="x",
                    yref=ref,
                    yshift=-3,
                    yanchor="top",
                    text=text,
                    showarrow=False,
                    font={"size": LABEL_PX, "color": "#444444"},
                )
    fig.update_layout(
        template=TEMPLATE,
        plot_bgcolor=MISSING_COLOR,
        width=size["width"],
        height=size["height"],
        margin={
            "l": max(int(size["left"]), 7 * max(len(label) for label in ylabels) + 30),
            "r": size["right"],
            "t": size["top"],
            "b": size["bottom"],
        },
        hovermode="x" if panels > 1 else "closest",
        hoversubplots="axis",  # hovering a cell shows the same cell of every panel
    )
