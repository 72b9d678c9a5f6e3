"""Figures of a causal basis: influence per direction, and the tokens each direction moves."""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go

from lenskit.errors import LenskitError
from lenskit.lenses.basis import CausalBasis
from lenskit.plotting.style import (
    FIGURE_WIDTH,
    LABEL_PX,
    PALETTE,
    TEMPLATE,
    TOKEN_KEY,
    display_token,
    label_chars,
    log_ticks,
)

__all__ = ["direction_tokens_plot", "influence_plot"]

_TOKEN_COLUMNS = ("direction", "side", "rank", "token", "logit_change")


def influence_plot(basis: CausalBasis, *, title: str | None = None) -> go.Figure:
    """Each direction's influence on the lens and on the model (bits, log scale).

    Directions are numbered in their sorted order (1 = most influential on the lens); the
    title gives Spearman's rank correlation between the two influences.

    Args:
        basis: The basis (its ``model_influence`` is drawn where it was measured).
        title: Figure title.

    Returns:
        The figure: a ``lens`` trace, then a ``model`` trace where measured.
    """
    x = list(range(1, basis.k + 1))
    series = {"lens": basis.lens_influence}
    if basis.model_influence is not None:
        series["model"] = basis.model_influence
    fig = go.Figure()
    for i, (name, values) in enumerate(series.items()):
        y = [v if v > 0 else None for v in values.tolist()]  # a log axis has no zero
        fig.add_trace(
            go.Scatter(
                x=x,
                y=y,
                mode="lines+markers",
                name=name,
                line={"color": PALETTE[i], "width": 2, "dash": "solid" if i == 0 else "dot"},
                marker={"size": 8, "symbol": "circle" if i == 0 else "diamond"},
                hovertemplate=f"direction %{{x}} · {name}: %{{y:.4g}} bits<extra></extra>",
            )
        )
    s = basis.settings
    rho = basis.spearman
    rho_text = f" · Spearman ρ = {rho:.2f}" if not math.isnan(rho) else ""
    ablation = s.get("config", {}).get("ablation", "")
    fig.update_layout(
        template=TEMPLATE,
        title_text=title
        or (
            f"Causal basis of layer {basis.layer} · {s.get('model', '')} · "
            f"{ablation} ablation{rho_text}"
        ),
        xaxis={
            "title_text": "direction (sorted by lens influence)",
            "tickmode": "array",
            "tickvals": x,
            "showgrid": False,
            "zeroline": False,
        },
        yaxis={
            "title_text": "KL of the ablated output, bits per token",
            "type": "log",
            **log_ticks([v for t in series.values() for v in t.tolist()]),
        },
        width=760,
        height=440,
        hovermode="x unified",
    )
    return fig


def direction_tokens_plot(
    frame: pd.DataFrame, *, title: str | None = None, width: int = FIGURE_WIDTH
) -> go.Figure:
    """For each direction, the tokens it promotes (right) and suppresses (left).

    One row per direction; cells hold a token, coloured by the change of its logit per unit
    step along the direction (blue: up, orange: down), from
    :func:`lenskit.causal.influence.direction_tokens`.

    Args:
        frame: Columns ``direction``, ``side`` (``promotes`` / ``suppresses``), ``rank``,
            ``token`` and ``logit_change``.
        title: Figure title.
        width: Figure width in pixels; tokens are shortened to fit their cells at 11 px.

    Returns:
        The figure: one heatmap trace.

    Raises:
        LenskitError: For missing columns or an empty table.
    """
    missing = [c for c in _TOKEN_COLUMNS if c not in getattr(frame, "columns", ())]
    if missing:
        raise LenskitError(
            f"the token table lacks column(s) {', '.join(missing)}: build it "
            "with lenskit.causal.influence.direction_tokens"
        )
    if frame.empty:
        raise LenskitError("the token table is empty: give a basis with at least one direction")
    directions = sorted(frame["direction"].unique().tolist())
    top = int(frame["rank"].max())
    columns = [-r for r in range(top, 0, -1)] + list(range(1, top + 1))
    cell_w = min(110.0, (width - 190) / len(columns))
    chars = label_chars(cell_w)
    z = [[math.nan] * len(columns) for _ in directions]
    text = [[""] * len(columns) for _ in directions]
    hover = [[""] * len(columns) for _ in directions]
    for row in frame.itertuples(index=False):
        r = directions.index(row.direction)
        c = columns.index(row.rank if row.side == "promotes" else -row.rank)
        z[r][c] = float(row.logit_change)
        text[r][c] = display_token(row.token, chars)
        hover[r][c] = (
            f"direction {row.direction} {row.side} {display_token(row.token, 40)}"
            f"<br>logit change {float(row.logit_change):+.3g} per unit step"
        )
    scale = max((abs(v) for line in z for v in line if not math.isnan(v)), default=1.0) or 1.0
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[str(c) for c in columns],
            y=[f"dir {d}" for d in directions],
            text=text,
            texttemplate="%{text}",
            textfont={"size": LABEL_PX},
            customdata=hover,
            hovertemplate="%{customdata}<extra></extra>",
            colorscale=[[0.0, PALETTE[1]], [0.5, "#ffffff"], [1.0, PALETTE[0]]],
            zmin=-scale,
            zmax=scale,
            xgap=1,
            ygap=1,
            colorbar={"title": {"text": "logit change"}},
        )
    )
    attrs = frame.attrs
    fig.update_layout(
        template=TEMPLATE,
        title_text=title
        or (
            f"Tokens each causal direction moves · layer {attrs.get('layer', '?')}"
            f" · {attrs.get('model', '')}"
        ),
        xaxis={
            "title_text": f"← suppressed (rank)   |   promoted (rank) →   (tokens: {TOKEN_KEY})",
            "side": "bottom",
            "tickmode": "array",
            "tickvals": [str(c) for c in columns],
            "ticktext": [str(abs(c)) for c in columns],
            "showgrid": False,
            "tickfont": {"size": LABEL_PX},
        },
        yaxis={"autorange": "reversed", "showgrid": False, "tickfont": {"size": LABEL_PX}},
        width=math.ceil(190 + cell_w * len(columns)),
        height=max(300, 34 * len(directions) + 170),
        margin={"l": 70, "r": 120},
    )
    return fig
