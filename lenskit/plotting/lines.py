"""Per-layer line plots: evaluation metrics by lens, and a target token's path."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import hex_to_rgb

from lenskit.errors import LenskitError
from lenskit.plotting.style import MISSING_COLOR, PALETTE, TEMPLATE, display_token
from lenskit.trajectory import Trajectory

__all__ = ["metric_lines", "target_plot"]


def _band_color(color: str, alpha: float = 0.18) -> str:
    r, g, b = hex_to_rgb(color)
    return f"rgba({r},{g},{b},{alpha})"


_WORDS = {"kl": "KL", "js": "JS", "ce": "cross-entropy", "tv": "total variation"}


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _band(x: list[int], lo: list[float], hi: list[float]) -> tuple[list, list]:
    """A closed outline per run of finite bounds, runs separated by None (gaps stay open)."""
    xs: list = []
    ys: list = []
    run: list[tuple[int, float, float]] = []
    for point in [*zip(x, lo, hi, strict=True), None]:
        if point is not None and _finite(point[1]) and _finite(point[2]):
            run.append(point)
            continue
        if run:
            if xs:
                xs.append(None)
                ys.append(None)
            xs += [p[0] for p in run] + [p[0] for p in reversed(run)]
            ys += [p[2] for p in run] + [p[1] for p in reversed(run)]
        run = []
    return xs, ys


def _mark_uncovered(fig: go.Figure, frame: pd.DataFrame) -> None:
    """Shade the layers some lens does not cover and name the lenses, as the heatmaps do."""
    if "covered" not in frame.columns:
        return
    missing = frame[~frame["covered"].astype(bool)]
    by_layer: dict[int, list[str]] = {}
    for lens, layer in zip(missing["lens"], missing["layer"].astype(int), strict=True):
        by_layer.setdefault(layer, []).append(str(lens))
    for layer, names in sorted(by_layer.items()):
        fig.add_vrect(
            x0=layer - 0.5,
            x1=layer + 0.5,
            fillcolor=MISSING_COLOR,
            opacity=0.45,
            line_width=0,
            layer="below",
        )
        fig.add_annotation(
            x=layer,
            y=0.5,
            xref="x",
            yref="paper",
            textangle=-90,
            showarrow=False,
            text=f"not covered by {', '.join(names)}",
            font={"size": 11, "color": "#555555"},
        )


def _metric_title(metric: str) -> str:
    """``kl_to_final_bits`` -> ``KL to final (bits)``."""
    words = metric.split("_")
    unit = " (bits)" if words[-1] == "bits" and len(words) > 1 else ""
    words = words[:-1] if unit else words
    return " ".join(_WORDS.get(w.lower(), w) for w in words) + unit


def metric_lines(
    frame: pd.DataFrame,
    *,
    metric: str = "kl_bits",
    band_z: int | float = 1.96,
    log_y: bool = False,
    title: str | None = None,
) -> go.Figure:
    """Per-layer line plot of an evaluation metric, one line per lens, with bands.

    Expected columns of ``frame`` (one row per lens and layer, already aggregated
    over the evaluation tokens):

    - ``lens`` (str): the lens name; one line each, in order of first appearance.
    - ``layer`` (int): the lens row, ``0..n_layers`` (``n_layers`` is the output).
    - ``<metric>`` (float): the value, e.g. ``kl_bits``.
    - optional uncertainty, either ``<metric>_se`` (a standard error: the band
      is ``value ± band_z * se``, 95% by default) or ``<metric>_lo`` and
      ``<metric>_hi`` (the band's edges, used as they are). With neither, no band.
    - optional ``layer_label`` (str): tick labels for the layers (``L0`` ... ``output``).
    - optional ``covered`` (bool): False where the lens does not read the layer (the
      J-lens at ``L0``); such a row is a gap in its line, shaded and labelled
      ``not covered by <lens>``, never joined to its neighbours.

    Missing values (NaN) are gaps in the line and its band.

    Args:
        frame: The metric table.
        metric: The metric column to plot.
        band_z: Multiple of the standard error that ``<metric>_se`` bands span.
        log_y: Use a log y axis.
        title: Figure title.

    Returns:
        The figure: per lens a band trace (``fill="toself"``, when the frame has
        uncertainty) then the line trace (``name`` = the lens).

    Raises:
        LenskitError: For missing columns or duplicate (lens, layer) rows.
    """
    if not isinstance(frame, pd.DataFrame):
        raise LenskitError(f"metric_lines takes a pandas DataFrame, got {type(frame).__name__}")
    missing = [c for c in ("lens", "layer", metric) if c not in frame.columns]
    if missing:
        raise LenskitError(
            f"the metric table lacks column(s) {', '.join(missing)}: it needs lens, layer and "
            f"{metric} (have {', '.join(map(str, frame.columns))})"
        )
    if frame.empty:
        raise LenskitError("the metric table is empty: evaluate at least one lens")
    dup = frame.duplicated(["lens", "layer"])
    if dup.any():
        row = frame[dup].iloc[0]
        raise LenskitError(
            f"the metric table has several rows for lens {row['lens']!r} layer {row['layer']}: "
            "aggregate to one row per lens and layer first"
        )
    has_se = f"{metric}_se" in frame.columns
    has_bounds = f"{metric}_lo" in frame.columns and f"{metric}_hi" in frame.columns
    fig = go.Figure()
    for i, (lens, group) in enumerate(frame.groupby("lens", sort=False)):
        group = group.sort_values("layer")
        color = PALETTE[i % len(PALETTE)]
        x = group["layer"].astype(int).tolist()
        y = group[metric].astype(float)
        if "covered" in group.columns:
            y = y.where(group["covered"].astype(bool))
        if has_bounds:
            lo, hi = group[f"{metric}_lo"].astype(float), group[f"{metric}_hi"].astype(float)
        elif has_se:
            se = group[f"{metric}_se"].astype(float)
            lo, hi = y - band_z * se, y + band_z * se
        if has_bounds or has_se:
            lo, hi = lo.where(y.notna()), hi.where(y.notna())
            band_x, band_y = _band(x, lo.tolist(), hi.tolist())
            fig.add_trace(
                go.Scatter(
                    x=band_x,
                    y=band_y,
                    fill="toself",
                    mode="lines",
                    fillcolor=_band_color(color),
                    line={"width": 0},
                    hoverinfo="skip",
                    showlegend=False,
                    legendgroup=str(lens),
                    name=f"{lens} band",
                )
            )
        band = ""
        if has_bounds or has_se:
            band = " [%{customdata[0]:.3g}, %{customdata[1]:.3g}]"
        fig.add_trace(
            go.Scatter(
                x=x,
                y=[v if _finite(v) else None for v in y.tolist()],
                mode="lines+markers",
                name=str(lens),
                legendgroup=str(lens),
                connectgaps=False,
                line={"color": color, "width": 2},
                marker={"size": 5},
                customdata=list(zip(lo, hi, strict=True)) if band else None,
                hovertemplate=f"{lens}: %{{y:.3g}}{band}<extra></extra>",
            )
        )
    layers = sorted(frame["layer"].astype(int).unique().tolist())
    xaxis: dict = {"title_text": "layer", "showgrid": False, "zeroline": False}
    if "layer_label" in frame.columns:
        names = frame.drop_duplicates("layer").set_index("layer")["layer_label"]
        step = max(1, math.ceil(len(layers) / 32))
        ticks = layers[::step] if layers[-1] in layers[::step] else [*layers[::step], layers[-1]]
        xaxis.update(tickmode="array", tickvals=ticks, ticktext=[str(names[t]) for t in ticks])
    fig.update_layout(
        template=TEMPLATE,
        title_text=title or f"{_metric_title(metric)} by layer",
        xaxis=xaxis,
        yaxis={"title_text": _metric_title(metric), "type": "log" if log_y else "linear"},
        width=820,
        height=460,
        hovermode="x unified",
    )
    _mark_uncovered(fig, frame)
    return fig


def _log_ticks(fig: go.Figure) -> dict:
    """Ticks 1, 2, 5, 10, 20, 50, ... spanning the plotted ranks, written in full."""
    values = [v for trace in fig.data for v in trace.y if v is not None]
    top = max(values, default=1)
    ticks = [m * 10**e for e in range(len(str(int(top))) + 1) for m in (1, 2, 5)]
    ticks = [t for t in ticks if t <= 5 * top]
    return {"tickmode": "array", "tickvals": ticks, "ticktext": [f"{t:,}" for t in ticks]}


def _positions(n_pos: int, positions: int | Sequence[int] | None) -> list[int]:
    if positions is None:
        return [n_pos - 1]
    chosen = [positions] if isinstance(positions, int) else list(positions)
    if not chosen:
        raise LenskitError("positions is empty: give at least one position, e.g. positions=[-1]")
    out = []
    for p in chosen:
        if isinstance(p, bool) or not isinstance(p, int) or not -n_pos <= p < n_pos:
            raise LenskitError(
                f"position {p!r} is outside the prompt's {n_pos} tokens: use 0..{n_pos - 1} "
                "(or negative from the end)"
            )
        out.append(p % n_pos)
    return out


def target_plot(
    trajs: Trajectory | Sequence[Trajectory],
    *,
    positions: int | Sequence[int] | None = None,
    value: str = "prob",
    title: str | None = None,
) -> go.Figure:
    """A target token's probability or rank across layers.

    With one trajectory there is one line per position; with several (lenses of
    the same prompt and target) one line per lens, or per lens and position.
    Rows a lens does not cover are gaps. Ranks are shown 1-based (1 = top-1) on
    a log axis.

    Args:
        trajs: A trajectory with a target, or several of the same prompt and target.
        positions: Positions to follow (default: the last one); negative counts
            from the end.
        value: ``"prob"`` or ``"rank"``.
        title: Figure title.

    Returns:
        The figure, one ``go.Scatter`` per line.

    Raises:
        LenskitError: Without a target, for mismatched trajectories or bad positions.
    """
    many = not isinstance(trajs, Trajectory)
    trajs = list(trajs) if many else [trajs]
    if not trajs:
        raise LenskitError("target_plot needs at least one trajectory")
    if value not in ("prob", "rank"):
        raise LenskitError(f"value must be 'prob' or 'rank', got {value!r}")
    first = trajs[0]
    for traj in trajs:
        if traj.target_prob is None or traj.target_rank is None:
            raise LenskitError(
                f"the {traj.lens_kind} trajectory has no target: pass target=' Paris' to "
                "lenskit.trajectory"
            )
        if traj.tokens != first.tokens or traj.target_id != first.target_id:
            raise LenskitError(
                "trajectories differ in prompt or target: compute them with the same "
                "prompt and target"
            )
    chosen = _positions(len(first.tokens), positions)
    fig = go.Figure()
    x = list(range(first.n_layers))
    fmt = ".3f" if value == "prob" else ",.0f"
    for i, traj in enumerate(trajs):
        for j, pos in enumerate(chosen):
            if value == "prob":
                ys = traj.target_prob[:, pos].tolist()
            else:
                ys = (traj.target_rank[:, pos] + 1).tolist()
            ys = [v if c else None for v, c in zip(ys, traj.covered.tolist(), strict=True)]
            where = f"pos {pos} {display_token(first.tokens[pos])}"
            if not many:
                name = where
            else:
                name = f"{traj.lens_kind} · {where}" if len(chosen) > 1 else traj.lens_kind
            color = PALETTE[(i if many else j) % len(PALETTE)]
            dash = ("solid", "dash", "dot", "dashdot")[j % 4] if many else "solid"
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=ys,
                    mode="lines+markers",
                    name=name,
                    connectgaps=False,
                    line={"color": color, "width": 2, "dash": dash},
                    marker={"size": 5},
                    customdata=[display_token(traj.top_tokens[r][pos][0]) for r in x],
                    hovertemplate=f"{name}: %{{y:{fmt}}} (top-1 %{{customdata}})<extra></extra>",
                )
            )
    step = max(1, math.ceil(len(x) / 32))
    ticks = x[::step] if x[-1] in x[::step] else [*x[::step], x[-1]]
    if value == "prob":
        yaxis = {"title_text": "target probability", "range": [0, 1.02]}
    else:
        yaxis = {"title_text": "target rank (1 = top-1)", "type": "log", **_log_ticks(fig)}
    fig.update_layout(
        template=TEMPLATE,
        title_text=title or f"target {display_token(first.target)} · {first.model_name}",
        xaxis={
            "title_text": "layer",
            "tickmode": "array",
            "tickvals": ticks,
            "ticktext": [first.layer_labels[t] for t in ticks],
            "showgrid": False,
            "zeroline": False,
        },
        yaxis=yaxis,
        width=820,
        height=460,
        hovermode="x unified",
    )
    return fig
