"""Per-layer line plots of evaluation metrics, one line per lens, with bands."""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go

from lenskit.errors import LenskitError
from lenskit.plotting.gaps import band_color, band_outline, finite, gap_connector
from lenskit.plotting.names import metric_name
from lenskit.plotting.style import PALETTE, TEMPLATE, coverage_note, log_ticks

__all__ = ["metric_lines", "training_lines"]


def _clip_first_layer(fig: go.Figure, lines: list[go.Scatter], first: int, label: str) -> None:
    """Keep one far-off first layer (the logit lens's L0: ~150 bits) from flattening the rest.

    When a line's value at the first layer is over three times the largest value at every
    other layer, the y axis stops just above the others and each clipped value is written
    at the top edge, in its line's colour; hovering still shows it.
    """
    rest = [v for t in lines for xi, v in zip(t.x, t.y, strict=True) if xi != first and v]
    if not rest or max(rest) <= 0:
        return
    top = max(rest)
    clipped = [
        (t, v)
        for t in lines
        for xi, v in zip(t.x, t.y, strict=True)
        if xi == first and v is not None and v > 3 * top
    ]
    if not clipped:
        return
    low = min(v for t in lines for v in t.y if v is not None)
    fig.update_yaxes(range=[min(0.0, low), top * 1.15])
    for i, (trace, value) in enumerate(clipped):
        fig.add_annotation(
            x=first,
            y=1,
            yref="paper",
            yshift=-16 * i,
            xanchor="left",
            yanchor="top",
            showarrow=False,
            text=f"↑ {trace.legendgroup} at {label}: {value:.3g} (off the scale)",
            font={"size": 12, "color": trace.line.color},
            bgcolor="rgba(255,255,255,0.85)",  # readable where the steep first segment passes
        )


def _lens_lines(
    fig: go.Figure, lens: str, group: pd.DataFrame, metric: str, color: str, band_z: float
) -> go.Scatter:
    """Add one lens's band (if the frame has one), line and gap connector; return the line."""
    group = group.sort_values("layer")
    x = group["layer"].astype(int).tolist()
    y = group[metric].astype(float)
    covered = [True] * len(x)
    if "covered" in group.columns:
        covered = group["covered"].astype(bool).tolist()
        y = y.where(group["covered"].astype(bool))
    lo = hi = None
    if f"{metric}_lo" in group.columns and f"{metric}_hi" in group.columns:
        lo, hi = group[f"{metric}_lo"].astype(float), group[f"{metric}_hi"].astype(float)
    elif f"{metric}_se" in group.columns:
        se = group[f"{metric}_se"].astype(float)
        lo, hi = y - band_z * se, y + band_z * se
    if lo is not None and hi is not None:
        lo, hi = lo.where(y.notna()), hi.where(y.notna())
        band_x, band_y = band_outline(x, lo.tolist(), hi.tolist())
        fig.add_trace(
            go.Scatter(
                x=band_x,
                y=band_y,
                fill="toself",
                mode="lines",
                fillcolor=band_color(color),
                line={"width": 0},
                hoverinfo="skip",
                showlegend=False,
                legendgroup=lens,
                name=f"{lens} band",
            )
        )
    labels = group["layer_label"].astype(str).tolist() if "layer_label" in group else x
    note = coverage_note([str(v) for v in labels], covered)
    values = [v if finite(v) else None for v in y.tolist()]
    connector = gap_connector(x, values, color, lens)
    if connector is not None:
        fig.add_trace(connector)
    band = " [%{customdata[0]:.3g}, %{customdata[1]:.3g}]" if lo is not None else ""
    line = go.Scatter(
        x=x,
        y=values,
        mode="lines+markers",
        name=f"{lens} ({note})" if note else lens,
        legendgroup=lens,
        connectgaps=False,
        line={"color": color, "width": 2.5},
        marker={"size": 7 if connector is not None else 5},
        customdata=list(zip(lo, hi, strict=True)) if band else None,
        hovertemplate=f"{lens}: %{{y:.3g}}{band}<extra></extra>",
    )
    fig.add_trace(line)
    return line


def metric_lines(
    frame: pd.DataFrame,
    *,
    metric: str = "kl_bits",
    band_z: int | float = 1.96,
    log_y: bool = False,
    title: str | None = None,
    clip_first: bool = True,
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
      J-lens at ``L0``, a causal basis at most layers); such a row is a gap in its
      line, and the legend names the rows the lens skips (or reads) once. A line with
      gaps inside gets a thin dotted line through its values to guide the eye.

    Missing values (NaN) are gaps in the line and its band. The axis and title use
    the metric's human name (``kl_bits``: "KL to the model's output (bits)"); a log
    axis is labelled in full (0.5, 2, 200).

    Args:
        frame: The metric table.
        metric: The metric column to plot.
        band_z: Multiple of the standard error that ``<metric>_se`` bands span.
        log_y: Use a log y axis.
        title: Figure title.
        clip_first: On a linear axis, stop the axis above the other layers when a
            line's first layer is over three times their largest value (the logit
            lens's L0 KL), writing the clipped value at the top edge.

    Returns:
        The figure: per lens a band trace (``fill="toself"``, when the frame has
        uncertainty), a dotted connector where the line has gaps, then the line
        trace (``legendgroup`` = the lens).

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
    fig = go.Figure()
    lines = [
        _lens_lines(fig, str(lens), group, metric, PALETTE[i % len(PALETTE)], band_z)
        for i, (lens, group) in enumerate(frame.groupby("lens", sort=False))
    ]
    layers = sorted(frame["layer"].astype(int).unique().tolist())
    names = {layer: f"L{layer}" for layer in layers}
    xaxis: dict = {"title_text": "layer", "showgrid": False, "zeroline": False}
    if "layer_label" in frame.columns:
        names = frame.drop_duplicates("layer").set_index("layer")["layer_label"].to_dict()
        step = max(1, math.ceil(len(layers) / 32))
        ticks = layers[::step] if layers[-1] in layers[::step] else [*layers[::step], layers[-1]]
        xaxis.update(tickmode="array", tickvals=ticks, ticktext=[str(names[t]) for t in ticks])
    yaxis: dict = {"title_text": metric_name(metric), "type": "log" if log_y else "linear"}
    if log_y:
        yaxis.update(log_ticks([v for t in lines for v in t.y if v is not None]))
    fig.update_layout(
        template=TEMPLATE,
        title_text=title or f"{metric_name(metric)} by layer",
        xaxis=xaxis,
        yaxis=yaxis,
        width=900,
        height=480,
        hovermode="x unified",
        legend={"orientation": "h", "y": -0.18, "x": 0, "font": {"size": 12}},
        margin={"b": 110},
    )
    if clip_first and not log_y:
        _clip_first_layer(fig, lines, layers[0], str(names[layers[0]]))
    return fig


def training_lines(frame: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Held-out KL per layer of a training run: the logit lens and the trained tuned lens.

    Args:
        frame: :meth:`lenskit.training.TrainResult.to_frame` (``layer``,
            ``logit_kl_bits``, ``tuned_kl_bits``).
        title: Figure title.

    Returns:
        :func:`metric_lines` of the two, in contrasting colours, the logit lens's far-off
        first layer written at the top edge rather than flattening the tuned line.
    """
    missing = [c for c in ("layer", "logit_kl_bits", "tuned_kl_bits") if c not in frame]
    if missing:
        raise LenskitError(
            f"the training table lacks column(s) {', '.join(missing)}: pass TrainResult.to_frame()"
        )
    long = pd.concat(
        [
            pd.DataFrame({"lens": name, "layer": frame["layer"], "kl_bits": frame[column]})
            for name, column in (("tuned lens", "tuned_kl_bits"), ("logit lens", "logit_kl_bits"))
        ],
        ignore_index=True,
    )
    long["layer_label"] = [f"L{int(v)}" for v in long["layer"]]
    return metric_lines(
        long,
        metric="kl_bits",
        title=title or "Held-out KL to the model's output by layer (bits)",
    )
