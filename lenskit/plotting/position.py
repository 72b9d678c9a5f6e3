"""One position in depth: every lens's top-k tokens at every layer, side by side.

A companion to :func:`lenskit.plotting.compare_heatmaps`: pick a position there (a
click on a cell, in the app) and see here what each lens reads at that position,
layer by layer, with probabilities; :func:`lenskit.plotting.target_plot` follows one
token's probability and rank at the same position.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from lenskit.errors import LenskitError
from lenskit.plotting.grid import fmt_prob
from lenskit.plotting.style import (
    FIGURE_WIDTH,
    LABEL_PX,
    MISSING_COLOR,
    TEMPLATE,
    TOKEN_KEY,
    coverage_note,
    display_token,
    label_chars,
    select_rows,
)
from lenskit.trajectory import Trajectory

__all__ = ["position_topk"]

_ROW_PX = 30  # two 11 px lines: the token, then its probability
_GAP = 0.02  # between panels, as a fraction of the plotting width


def _check(trajs: list[Trajectory], pos: int, k: int) -> int:
    if not trajs:
        raise LenskitError("position_topk needs at least one trajectory")
    first = trajs[0]
    for other in trajs[1:]:
        if other.tokens != first.tokens or other.layer_labels != first.layer_labels:
            raise LenskitError(
                "trajectories have different tokens or layers: compute them all from the "
                "same prompt and model"
            )
    n = len(first.tokens)
    if isinstance(pos, bool) or not isinstance(pos, int) or not -n <= pos < n:
        raise LenskitError(f"position {pos!r} is outside the prompt's {n} tokens: use 0..{n - 1}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= first.top_probs.shape[-1]:
        raise LenskitError(
            f"k must be 1..{first.top_probs.shape[-1]} (the trajectories' top-k), got {k!r}"
        )
    pos %= n
    for traj in trajs:
        traj.cells.check_shown([0], [pos], f"{traj.lens_kind} trajectory")
    return pos


def _cell_prob(p: float) -> str:
    """A probability short enough for a narrow cell: ``0.435``, ``8e-24`` (5 characters).

    The hover text keeps three significant digits (:func:`~lenskit.plotting.grid.fmt_prob`).
    """
    if p != p:
        return ""
    return f"{p:.3f}" if p >= 1e-3 else f"{p:.0e}".replace("e-0", "e-")


def _panel(
    traj: Trajectory, pos: int, rows: list[int], k: int, chars: int, axis: int
) -> go.Heatmap:
    covered = traj.covered.tolist()
    probs = traj.top_probs[:, pos, :k].double().numpy()[rows]
    probs[[not covered[r] for r in rows]] = np.nan
    text, hover = [], []
    for i, r in enumerate(rows):
        line_t, line_h = [], []
        for j in range(k):
            if not covered[r]:
                line_t.append("")
                line_h.append(f"{traj.layer_labels[r]}: not read by the {traj.lens_kind} lens")
                continue
            token = traj.top_tokens[r][pos][j]
            label = display_token(token, chars)
            if traj.target_id is not None and int(traj.top_ids[r, pos, j]) == traj.target_id:
                label = f"<b>{label}</b>"  # the target token, wherever it ranks
            line_t.append(f"{label}<br>{_cell_prob(float(probs[i, j]))}")
            line_h.append(
                f"<b>{traj.lens_kind}</b> · {traj.layer_labels[r]} · rank {j + 1}<br>"
                f"{display_token(token, 40)}: p = {fmt_prob(float(probs[i, j]))}"
            )
        text.append(line_t)
        hover.append(line_h)
    suffix = "" if axis == 1 else str(axis)
    return go.Heatmap(
        z=probs,
        x=np.arange(1, k + 1),
        y=np.arange(len(rows)),
        text=np.array(text, dtype=str),
        customdata=np.array(hover, dtype=str),
        texttemplate="%{text}",
        textfont={"size": LABEL_PX},
        hovertemplate="%{customdata}<extra></extra>",
        coloraxis="coloraxis",
        xgap=1,
        ygap=1,
        name=traj.lens_kind,
        xaxis=f"x{suffix}",
        yaxis="y",
    )


def position_topk(
    trajs: Trajectory | Sequence[Trajectory],
    pos: int,
    *,
    k: int = 5,
    layer_stride: int = 1,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    width: int = FIGURE_WIDTH,
) -> go.Figure:
    """Each lens's top-``k`` tokens and their probabilities at one position, every layer.

    One panel per lens, side by side, sharing the rows (``L0`` at the bottom, the
    model's ``output`` at the top); a cell holds the token at that rank and its
    probability, coloured by the probability (0..1). The target token, where the
    trajectories have one, is bold wherever it appears. Rows a lens does not read are
    blank (grey), named once in its panel's title.

    Args:
        trajs: One trajectory or several of the same prompt (different lenses).
        pos: The position (negative counts from the end).
        k: Tokens per layer (at most the trajectories' top-k).
        layer_stride: Show every n-th row (the output row is always shown).
        labels: Panel titles (default: the lens kinds).
        title: Figure title.
        width: Figure width in pixels; labels are shortened to fit it.

    Returns:
        The figure: one heatmap per lens, on axes ``x``, ``x2``, ... and one ``y``.

    Raises:
        LenskitError: For mismatched trajectories, a position outside the prompt,
            a bad ``k`` or stride, or a position the trajectories did not compute.
    """
    trajs = [trajs] if isinstance(trajs, Trajectory) else list(trajs)
    pos = _check(trajs, pos, k)
    labels = list(labels) if labels is not None else [t.lens_kind for t in trajs]
    if len(labels) != len(trajs):
        raise LenskitError(f"got {len(labels)} labels for {len(trajs)} trajectories: give one each")
    first = trajs[0]
    rows = select_rows(first.layer_labels, layer_stride)
    left, right = 80, 110
    n = len(trajs)
    panel_w = (width - left - right) * (1 - _GAP * (n - 1)) / n
    chars = label_chars(panel_w / k)
    fig = go.Figure()
    for i, traj in enumerate(trajs, start=1):
        fig.add_trace(_panel(traj, pos, rows, k, chars, i))
    step = 1 / n
    for i, (label, traj) in enumerate(zip(labels, trajs, strict=True)):
        suffix = "" if i == 0 else str(i + 1)
        x0 = i * step + (_GAP / 2 if i else 0)
        x1 = (i + 1) * step - (_GAP / 2 if i < n - 1 else 0)
        fig.layout[f"xaxis{suffix}"] = {
            "domain": [x0, x1],
            "tickmode": "array",
            "tickvals": list(range(1, k + 1)),
            "ticktext": [f"#{j}" for j in range(1, k + 1)],
            "side": "top",
            "showgrid": False,
            "zeroline": False,
            "tickfont": {"size": LABEL_PX},
            "anchor": "y",
        }
        note = coverage_note(
            [traj.layer_labels[r] for r in rows], [bool(traj.covered[r]) for r in rows]
        )
        fig.add_annotation(
            x=(x0 + x1) / 2,
            y=1,
            xref="paper",
            yref="paper",
            yshift=24,
            yanchor="bottom",
            showarrow=False,
            # Two lines in every panel (the second may be blank), so the titles align.
            text=f"<b>{label}</b><br><span style='color:#555'>{note or '&nbsp;'}</span>",
            font={"size": 13},
        )
    target = f" · target {display_token(first.target)} in bold" if first.target is not None else ""
    fig.update_layout(
        template=TEMPLATE,
        plot_bgcolor=MISSING_COLOR,
        title_text=title
        or f"Top-{k} tokens at position {pos} ({display_token(first.tokens[pos])} → next "
        f"{display_token(first.next_tokens[pos])}) · {first.model_name}{target}"
        f"<br><sup>tokens: {TOKEN_KEY}</sup>",
        coloraxis={
            "colorscale": "Blues",
            "cmin": 0.0,
            "cmax": 1.0,
            "colorbar": {"title": {"text": "probability", "side": "right"}, "thickness": 14},
        },
        yaxis={
            "tickmode": "array",
            "tickvals": list(range(len(rows))),
            "ticktext": [first.layer_labels[r] for r in rows],
            "range": [-0.5, len(rows) - 0.5],
            "showgrid": False,
            "zeroline": False,
            "tickfont": {"size": LABEL_PX},
            "title_text": "layer",
        },
        width=width,
        height=len(rows) * _ROW_PX + 180,
        margin={"l": left, "r": right, "t": 150, "b": 30},
        hovermode="closest",
    )
    return fig
